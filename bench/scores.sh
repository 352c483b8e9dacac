#!/usr/bin/env bash
# Scoring at the limits: how long one `/v1/scores` request takes when it asks for the most
# work the default limits allow (--max-score-tokens tokens), on the demo model, through a
# real `molt serve` (release build). Several request shapes of the same total are timed in
# interleaved rounds; the medians and the request timeout they must stay well inside are
# printed as JSON lines (`metric`, `value`, `unit`, settings).
#
#   bench/scores.sh [ROUNDS]        # default 3 rounds
#
# The budget is not assumed from a token count guessed here: each shape starts above it and
# is shrunk until the server accepts it (413 → 200), and the tokens scored are the answer's
# `usage.prompt_tokens`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
rounds="${1:-3}"
cd "$repo"
cargo build --release --bin molt --quiet
molt="${CARGO_TARGET_DIR:-$repo/target}/release/molt"
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$molt" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --workers 0 \
    --rate-limit-requests 0 >"$work/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do curl -fs -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.1; done
key="$(cat "$work/data/first-key")"

python3 - "$port" "$key" "$rounds" <<'EOF'
import json, statistics, sys, time, urllib.request

port, key, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
url = f"http://127.0.0.1:{port}/v1/scores"
words = "the quick brown fox jumps over the lazy dog and runs far away into woods".split()

def post(body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.load(r)
            return r.status, out, time.perf_counter() - t
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), time.perf_counter() - t

def text(n):
    return " ".join(words[i % len(words)] for i in range(n))

def request(items, choices, ctx_words, choice_words):
    return {"model": "demo", "items": [
        {"context": text(ctx_words), "choices": [" " + text(choice_words + c % 2) for c in range(choices)]}
        for _ in range(items)]}

# Shapes: (items, choices, context words, choice words). Each is scaled down until the
# server accepts it, so every shape is as close to the budget as the tokenizer allows.
shapes = [(256, 2, 48, 8), (64, 4, 96, 24), (1024, 4, 4, 2), (16, 64, 16, 8)]
accepted = []
for items, choices, cw, chw in shapes:
    while True:
        status, out, _ = post(request(items, choices, cw, chw))
        if status == 200:
            accepted.append(((items, choices, cw, chw), out["usage"]["prompt_tokens"]))
            break
        if status != 413:
            sys.exit(f"unexpected {status}: {out}")
        items = max(1, items * 9 // 10)

times = {s: [] for s, _ in accepted}
for _ in range(rounds):
    for s, _ in accepted:
        status, out, dt = post(request(*s))
        assert status == 200, out
        times[s].append(dt)
for s, tokens in accepted:
    med = statistics.median(times[s])
    print(json.dumps({"metric": "score_request_seconds", "value": round(med, 3), "unit": "s",
        "items": s[0], "choices": s[1], "tokens": tokens,
        "tokens_per_s": round(tokens / med), "rounds": rounds, "model": "demo"}))
EOF
