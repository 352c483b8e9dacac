"""The official `openai` client against molt, unchanged: files.create ->
fine_tuning.jobs.create -> retrieve until done -> list_events (plus the list calls).

Environment: MOLT_URL (server base URL), MOLT_API_KEY, MOLT_DATASET (a JSONL file),
MOLT_MODEL (base model id), MOLT_METHOD (JSON of the PEFT method).
"""

import json
import os
import sys
import time

import openai

client = openai.OpenAI(base_url=os.environ["MOLT_URL"] + "/v1", api_key=os.environ["MOLT_API_KEY"])

with open(os.environ["MOLT_DATASET"], "rb") as f:
    uploaded = client.files.create(file=f, purpose="fine-tune")
assert uploaded.object == "file", uploaded
assert uploaded.status == "processed", uploaded
assert uploaded.purpose == "fine-tune", uploaded
assert any(x.id == uploaded.id for x in client.files.list().data)
assert client.files.retrieve(uploaded.id).bytes == os.path.getsize(os.environ["MOLT_DATASET"])

job = client.fine_tuning.jobs.create(
    model=os.environ["MOLT_MODEL"],
    training_file=uploaded.id,
    hyperparameters={"n_epochs": 2, "batch_size": 4},
    method=json.loads(os.environ["MOLT_METHOD"]),
    suffix="openai",
    seed=3,
)
assert job.object == "fine_tuning.job", job
assert job.status in ("validating_files", "queued", "running"), job

deadline = time.time() + 240
while True:
    job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    assert time.time() < deadline, f"job not finished in time: {job}"
    time.sleep(0.3)
assert job.status == "succeeded", job
assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:"), job
assert job.trained_tokens and job.trained_tokens > 0, job
assert job.error is None, job

events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=100)
messages = [e.message for e in events.data]
assert all(e.object == "fine_tuning.job.event" for e in events.data)
assert any("successfully completed" in m for m in messages), messages

jobs = client.fine_tuning.jobs.list(limit=10)
assert any(j.id == job.id for j in jobs.data), jobs
checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
assert all(c.object == "fine_tuning.job.checkpoint" for c in checkpoints.data)
models = [m.id for m in client.models.list().data]
assert job.fine_tuned_model in models, models

# Errors surface as the client's exception types, with OpenAI's envelope.
try:
    client.fine_tuning.jobs.retrieve("ftjob-does-not-exist")
    raise AssertionError("expected a 404")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.fine_tuning.jobs.cancel(job.id)
    raise AssertionError("expected a 409")
except openai.ConflictError as e:
    assert e.status_code == 409

print("openai flow OK:", job.id, job.fine_tuned_model, len(messages), "events")
sys.exit(0)
