#!/usr/bin/env bash
# Builds the Docker image and checks that the container does what the README says: it starts
# `molt serve` on the embedded default, prints the first key into /data, lists the demo model,
# and a LoRA fine-tuning job on the demo model runs to `succeeded` and yields an adapter.
#
#   scripts/check-docker.sh            # build from the working tree, then check
#   IMAGE=molt SKIP_BUILD=1 scripts/check-docker.sh   # check an image built already
#
# Needs a Docker daemon (so it is run by hand, not by scripts/test.sh). The container uses
# the host network (port $PORT on 127.0.0.1) so it also works where Docker's bridge cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-molt-check}
PORT=${PORT:-18080}
if [ -z "${SKIP_BUILD:-}" ]; then
    docker build --network host -t "$IMAGE" .
fi

name="molt-check-$$"
work=$(mktemp -d)
cleanup() {
    docker logs "$name" > "$work/container.log" 2>&1 || true
    docker rm -f "$name" > /dev/null 2>&1 || true
    docker volume rm "$name" > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
fail() {
    echo "check-docker: $*" >&2
    docker logs "$name" 2>&1 | tail -40 >&2 || true
    exit 1
}

docker run -d --name "$name" --network host -v "$name:/data" \
    -e MOLT_LISTEN="127.0.0.1:$PORT" -e MOLT_ADMIN_TOKEN=check "$IMAGE" > /dev/null
url="http://127.0.0.1:$PORT"
for _ in $(seq 120); do
    curl -fs "$url/healthz" > /dev/null 2>&1 && break
    sleep 1
done
curl -fs "$url/healthz" > /dev/null || fail "/healthz never answered"
key=$(docker exec "$name" cat /data/first-key) || fail "no /data/first-key"
auth=(-H "Authorization: Bearer $key")
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

curl -fs "$url/v1/models" "${auth[@]}" | grep -q '"demo"' || fail "the demo model is not listed"

# A small text dataset from the repository's own corpus.
python3 - "$work/train.jsonl" <<'EOF'
import json, pathlib, sys
text = " ".join(sorted(pathlib.Path("corpus").rglob("*.txt"))[0].read_text().split())
with open(sys.argv[1], "w") as f:
    for i in range(32):
        f.write(json.dumps({"text": text[i * 200:(i + 1) * 200]}) + "\n")
EOF
file=$(curl -fs "$url/v1/files" "${auth[@]}" -F purpose=fine-tune -F "file=@$work/train.jsonl" | json '["id"]') \
    || fail "upload failed"
job=$(curl -fs "$url/v1/fine_tuning/jobs" "${auth[@]}" -H 'Content-Type: application/json' \
    -d "{\"model\": \"demo\", \"training_file\": \"$file\", \"method\": {\"type\": \"lora\", \"targets\": \"in_proj\", \"r\": 4}, \"hyperparameters\": {\"n_epochs\": 1, \"batch_size\": 4}}" \
    | json '["id"]') || fail "creating the job failed"
status=""
for _ in $(seq 300); do
    status=$(curl -fs "$url/v1/fine_tuning/jobs/$job" "${auth[@]}" | json '["status"]')
    case "$status" in succeeded|failed|cancelled) break ;; esac
    sleep 1
done
[ "$status" = succeeded ] || fail "job $job ended as '$status'"
model=$(curl -fs "$url/v1/fine_tuning/jobs/$job" "${auth[@]}" | json '["fine_tuned_model"]')
curl -fs "$url/v1/completions" "${auth[@]}" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"prompt\": \"It is a truth\", \"max_tokens\": 8}" | json '["choices"][0]["text"]' \
    > /dev/null || fail "no completion from $model"
echo "check-docker: ok ($IMAGE: healthz, first key, demo model, job $job succeeded, $model completes)"
