#!/usr/bin/env bash
# The README's walk-through as a new user runs it: a fresh clone of this repository (HEAD) in
# a fresh temporary directory, the README's first command (`cargo run --release --bin molt --
# serve`) started there, then the README blocks marked `<!-- walkthrough: sh -->` run by bash
# and `<!-- walkthrough: sh-vision -->` run by bash, and `<!-- walkthrough: python -->` run by
# a Python with the `openai` package — each exactly as written. Checks: every command
# succeeds, the fine-tuning jobs succeed, the fine-tuned models complete and classify. (The README's second command, scripts/test.sh, is the one that
# runs this script.)
#
# The README's examples talk to http://127.0.0.1:8080, so that port must be free. Builds reuse
# this checkout's target directory (CARGO_TARGET_DIR is honoured); the openai client comes
# from ${MOLT_CACHE_DIR:-~/.cache/molt}/openai-venv (installed from PyPI on first use, as the
# openai client tests do).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
log() { printf 'walkthrough: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

for tool in curl jq git python3; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (the README's set-up needs it)"
done
if curl -s -o /dev/null "http://127.0.0.1:8080/" 2>/dev/null; then
    fail "something already answers on 127.0.0.1:8080, the README's address"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/molt-walkthrough.XXXXXX")"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        # cargo run's child is molt; signal the whole process group it leads.
        kill -TERM -- "-$server_pid" 2>/dev/null || kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Extracts the fenced block that follows `<!-- walkthrough: KIND -->` in the README.
block() {
    awk -v kind="$1" '
        $0 == "<!-- walkthrough: " kind " -->" { want = 1; next }
        want && /^```/ { if (inside) exit; inside = 1; next }
        inside { print }
    ' "$repo/README.md"
}
first_command() {
    # The README's first fenced block, first line, without its comment.
    awk '/^```sh/ { getline; sub(/[[:space:]]+#.*/, ""); print; exit }' "$repo/README.md"
}

serve_cmd="$(first_command)"
[ "$serve_cmd" = "cargo run --release --bin molt -- serve" ] ||
    fail "the README's first command changed to '$serve_cmd'; update this script"
sh_block="$(block sh)"
vision_block="$(block sh-vision)"
py_block="$(block python)"
search_block="$(block sh-search)"
[ -n "$sh_block" ] && [ -n "$vision_block" ] && [ -n "$py_block" ] && [ -n "$search_block" ] ||
    fail "walk-through blocks not found in README.md"

git clone --quiet "$repo" "$work/molt"
cd "$work/molt"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
log "building and starting: $serve_cmd (in $work/molt)"
# Build first, so that the wait for the server below does not include the build.
cargo build --release --bin molt --quiet
set -m
env -u MOLT_DATA_DIR -u MOLT_MODELS_DIR -u MOLT_DATABASE_URL -u MOLT_STORE -u MOLT_LISTEN \
    bash -c "exec $serve_cmd" >"$work/serve.log" 2>&1 &
server_pid=$!
set +m
for _ in $(seq 1 300); do
    curl -fs -o /dev/null http://127.0.0.1:8080/readyz && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; fail "molt serve exited"; }
    sleep 0.2
done
curl -fs -o /dev/null http://127.0.0.1:8080/readyz || { cat "$work/serve.log" >&2; fail "molt serve not ready"; }

log "running the README's shell walk-through"
bash -euo pipefail -c "$sh_block
status=\$(curl -s \$URL/v1/fine_tuning/jobs/\$JOB -H \"Authorization: Bearer \$KEY\" | jq -r .status)
[ \"\$status\" = succeeded ] || { echo \"job \$JOB ended \$status\" >&2; exit 1; }
[ -s adapter_model.safetensors ] || { echo 'no adapter downloaded' >&2; exit 1; }
curl -s \$URL/v1/completions -H \"Authorization: Bearer \$KEY\" -H 'Content-Type: application/json' \\
  -d '{\"model\": \"'\$MODEL'\", \"prompt\": \"Question 3\", \"max_tokens\": 2, \"temperature\": 0}' |
  jq -e '.choices[0].text | type == \"string\"' >/dev/null || { echo 'no completion' >&2; exit 1; }
" >"$work/sh.out" 2>&1 || { cat "$work/sh.out" "$work/serve.log" >&2; fail "the shell walk-through"; }
grep -q '"object":"text_completion"' "$work/sh.out" ||
    { cat "$work/sh.out" >&2; fail "the walk-through's completion did not answer"; }

log "running the README's image walk-through"
bash -euo pipefail -c "$vision_block
status=\$(curl -s \$URL/v1/fine_tuning/jobs/\$JOB -H \"Authorization: Bearer \$KEY\" | jq -r .status)
[ \"\$status\" = succeeded ] || { echo \"job \$JOB ended \$status\" >&2; exit 1; }
" >"$work/vision.out" 2>&1 || { cat "$work/vision.out" "$work/serve.log" >&2; fail "the image walk-through"; }
tail -n 1 "$work/vision.out" | jq -e '.object == "list" and (.data[0].predictions | length == 3)
    and ([.data[0].predictions[].label] - ["five", "six", "seven", "eight", "nine"] == [])' >/dev/null ||
    { cat "$work/vision.out" >&2; fail "the image walk-through's classification did not answer"; }

log "running the README's search walk-through"
bash -euo pipefail -c "$search_block
job=null
until [ \"\$job\" != null ]; do sleep 1; job=\$(curl -s \$URL/v1/fine_tuning/searches/\$SEARCH -H \"Authorization: Bearer \$KEY\" | jq -r .result_job_id); done
until curl -s \$URL/v1/fine_tuning/jobs/\$job -H \"Authorization: Bearer \$KEY\" | jq -e '.status | IN(\"succeeded\", \"failed\", \"cancelled\")' >/dev/null; do sleep 1; done
curl -s \$URL/v1/fine_tuning/jobs/\$job -H \"Authorization: Bearer \$KEY\" | jq -e '.status == \"succeeded\"' >/dev/null
" >"$work/search.out" 2>&1 || { cat "$work/search.out" "$work/serve.log" >&2; fail "the search walk-through"; }
tail -n 1 "$work/search.out" | jq -e '.status == "succeeded" and .trial_counts.finished == 6 and (.best.value | type == "number")' >/dev/null ||
    { cat "$work/search.out" >&2; fail "the search walk-through did not succeed"; }

log "running the README's openai walk-through"
cache="${MOLT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/molt}"
venv="$cache/openai-venv"
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    mkdir -p "$cache"
    (
        exec 9>"$cache/openai-venv.lock"
        flock 9
        if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
            rm -rf "$venv"
            python3 -m venv "$venv"
            "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.40,<3'
        fi
    ) || fail "could not install the openai client"
fi
"$venv/bin/python" -c "$py_block" >"$work/py.out" 2>&1 ||
    { cat "$work/py.out" "$work/serve.log" >&2; fail "the openai walk-through"; }
head -n 1 "$work/py.out" | grep -q '^succeeded ft:' ||
    { cat "$work/py.out" >&2; fail "the openai walk-through's job did not succeed"; }
[ "$(wc -l <"$work/py.out")" -ge 2 ] || { cat "$work/py.out" >&2; fail "no completion printed"; }
log "passed: the README's walk-through works from a fresh clone"
