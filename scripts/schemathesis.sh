#!/usr/bin/env bash
# openapi.yaml against the running server: schemathesis runs every check (status codes,
# content types, headers and bodies against the document, schema-valid data accepted,
# schema-violating data rejected, authentication, use after delete, …) in every phase —
# examples, coverage, fuzzing and stateful testing through the document's `links` — against a
# fresh `molt serve`, and fails on anything it finds. Part of scripts/test.sh.
#
#     bash scripts/schemathesis.sh            # about 2½ minutes on 2 cores
#
# The server runs on a temporary data directory and a free port with the admin token set and
# the rate limit off (429 stays documented), and with the total-work limits lowered so that
# every generated completion or scoring request is quick on a debug build (their 413 is
# documented; the per-field limits, which the document states, keep their defaults). Before
# testing, small jobs of six PEFT methods are trained on the demo model by a `molt worker` that
# then stops, so the stateful run finds adapters, fine-tuned and merged models to walk (jobs
# it creates stay queued).
#
# Two runs, because schemathesis sends one credential per security scheme and the admin
# routes can revoke the tenant's key: first /v1/* and the probes with the tenant's key, then
# /admin/* with the admin token. scripts/schemathesis.toml holds the credentials and the two
# statuses the document gives to requests no schema can judge (413, 422).
#
# Environment: MOLT_BIN (default target/debug/molt, built if absent), MOLT_ST_SEED (default
# 1), MOLT_ST_TIME_V1 / MOLT_ST_TIME_ADMIN (seconds per run, default 100 / 45), MOLT_ST_ARGS
# (more `st run` arguments, e.g. `--report ndjson --report-dir /tmp/st`),
# MOLT_CACHE_DIR (default ~/.cache/molt: schemathesis goes into its st-venv, installed from
# PyPI on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

st_version=4.32.5
molt="${MOLT_BIN:-$root/target/debug/molt}"
seed="${MOLT_ST_SEED:-1}"
time_v1="${MOLT_ST_TIME_V1:-100}"
time_admin="${MOLT_ST_TIME_ADMIN:-45}"
cache="${MOLT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/molt}"
venv="$cache/st-venv"

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

if [ ! -x "$molt" ]; then
    log "building $molt"
    cargo build -p api --bin molt
fi

# schemathesis, pinned, in its own virtualenv (one installer at a time).
if [ "$("$venv/bin/st" --version 2>/dev/null)" != "st, version $st_version" ]; then
    log "installing schemathesis $st_version into $venv"
    mkdir -p "$cache"
    (
        if command -v flock >/dev/null 2>&1; then
            exec 9>"$venv.lock"
            flock 9
        fi
        if [ "$("$venv/bin/st" --version 2>/dev/null)" != "st, version $st_version" ]; then
            rm -rf "$venv"
            python3 -m venv "$venv" &&
                "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$st_version"
        fi
    ) || {
        log "could not install schemathesis"
        rm -rf "$venv"
        exit 1
    }
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/molt-st.XXXXXX")"
server_pid=""
worker_pid=""
cleanup() {
    for pid in $worker_pid $server_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
url="http://127.0.0.1:$port"
admin_token="st-admin-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
data="$work/data"
mkdir -p "$data"

MOLT_ADMIN_TOKEN="$admin_token" "$molt" serve --listen "127.0.0.1:$port" --data-dir "$data" \
    --workers 0 --rate-limit-requests 0 --log warn \
    --max-completion-tokens 4096 --max-score-tokens 4096 \
    >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 150); do
    curl -fsS -o /dev/null "$url/healthz" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { log "molt serve exited:"; cat "$work/server.log" >&2; exit 1; }
    sleep 0.2
done
curl -fsS -o /dev/null "$url/healthz" || { log "molt serve did not answer"; cat "$work/server.log" >&2; exit 1; }
key="$(cat "$data/first-key")"

# Finished jobs of several methods on the demo model: adapters (one of a method without a
# merged form), fine-tuned and merged models to walk.
for i in $(seq 1 16); do
    echo "{\"prompt\": \"Question $i: who wrote Emma?\", \"completion\": \" Jane Austen.\"}"
done >"$work/train.jsonl"
file_id="$(curl -fsS "$url/v1/files" -H "Authorization: Bearer $key" \
    -F purpose=fine-tune -F "file=@$work/train.jsonl" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')"
jobs=()
for method in '{"type": "lora", "targets": "in_proj", "r": 4}' '{"type": "bitfit"}' \
    '{"type": "dora", "targets": "out_proj", "r": 2}' '{"type": "parallel_adapter", "r": 4}' \
    '{"type": "prompt", "n": 2}' '{"type": "additional_scan", "n_add": 2}'; do
    jobs+=("$(curl -fsS "$url/v1/fine_tuning/jobs" -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/json' \
        -d "{\"model\": \"demo\", \"training_file\": \"$file_id\", \"method\": $method,
             \"hyperparameters\": {\"n_epochs\": 1, \"batch_size\": 8}}" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')")
done
"$molt" worker --database-url "$data/molt.db" --store "$data/blobs" --work-dir "$work/worker" \
    --poll-interval-ms 200 --log warn >"$work/worker.log" 2>&1 &
worker_pid=$!
for job in "${jobs[@]}"; do
    status=""
    for _ in $(seq 1 600); do
        status="$(curl -fsS "$url/v1/fine_tuning/jobs/$job" -H "Authorization: Bearer $key" |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')"
        case "$status" in succeeded | failed | cancelled) break ;; esac
        sleep 0.5
    done
    if [ "$status" != succeeded ]; then
        log "seed job $job ended as '$status':"
        cat "$work/worker.log" >&2
        exit 1
    fi
done
kill "$worker_pid" 2>/dev/null || true
wait "$worker_pid" 2>/dev/null || true
worker_pid=""
log "server on $url with ${#jobs[@]} trained adapters; testing (seed $seed)"

export MOLT_ST_API_KEY="$key" MOLT_ST_ADMIN_TOKEN="$admin_token"
st_run() {
    # From the work directory: nothing (reports, example databases) lands in the checkout.
    (cd "$work" && "$venv/bin/st" --config-file "$root/scripts/schemathesis.toml" run \
        "$root/openapi.yaml" --url "$url" --checks all \
        --phases examples,coverage,fuzzing,stateful --workers 2 --seed "$seed" \
        --generation-database none --no-color ${MOLT_ST_ARGS:-} "$@")
}
# One run, repeated once when it failed without a finding: schemathesis can stop on an error
# inside its own data generation (seen once: hypothesis' FlakyFailure over a CPython
# "SystemError: AST constructor recursion depth mismatch", with every request passing). Its
# JUnit report tells the two apart: a check that failed is a <failure>, anything else that
# stopped a test is an <error>. A finding fails at once; an error that happens twice fails too.
st_checked() {
    local name="$1" report
    shift
    for attempt in 1 2; do
        report="$work/report-$name-$attempt"
        if st_run "$@" --report junit --report-dir "$report"; then
            return 0
        fi
        if [ "$attempt" = 2 ] || grep -qs '<failure' "$report"/*.xml ||
            ! grep -qs '<error' "$report"/*.xml; then
            return 1
        fi
        log "the $name run stopped on an error, not a finding (JUnit report: no <failure>); once more"
        grep -hs -A3 '<error' "$report"/*.xml | head -n 20 >&2 || true
    done
}
failed=0
st_checked v1 --max-time "$time_v1" --exclude-path-regex '^/admin/' || failed=1
st_checked admin --max-time "$time_admin" --include-path-regex '^/admin/' || failed=1
if ! kill -0 "$server_pid" 2>/dev/null; then
    log "molt serve died:"
    tail -n 50 "$work/server.log" >&2
    failed=1
fi
if [ "$failed" != 0 ]; then
    log "schemathesis found problems (server log: last lines below)"
    tail -n 30 "$work/server.log" >&2
    exit 1
fi
log "openapi.yaml and the server agree"
