"""The official `openai` client's completions against molt, unchanged: a plain completion,
then the same one streamed (server-sent events ending with [DONE]); the streamed text must
equal the plain text.

Environment: MOLT_URL (server base URL), MOLT_API_KEY, MOLT_MODEL (model to complete with).
"""

import os

import openai

client = openai.OpenAI(base_url=os.environ["MOLT_URL"] + "/v1", api_key=os.environ["MOLT_API_KEY"])
model = os.environ["MOLT_MODEL"]
prompt = "It is a truth universally acknowledged"

plain = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
assert plain.object == "text_completion", plain
assert len(plain.choices) == 1, plain
assert plain.choices[0].finish_reason in ("stop", "length"), plain
assert plain.usage.completion_tokens >= 1, plain
assert len(plain.choices[0].logprobs.token_logprobs) == plain.usage.completion_tokens, plain

text = ""
finish = None
chunks = 0
usage = None
for chunk in client.completions.create(
    model=model,
    prompt=prompt,
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.text
        if c.finish_reason is not None:
            finish = c.finish_reason
assert chunks >= 2, chunks
assert text == plain.choices[0].text, (text, plain.choices[0].text)
assert finish == plain.choices[0].finish_reason, finish
assert usage is not None and usage.total_tokens == plain.usage.total_tokens, usage

try:
    client.completions.create(model="no-such-model", prompt="a", max_tokens=1)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

print("streamed", chunks, "chunks:", repr(text))
