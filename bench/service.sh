#!/usr/bin/env bash
# molt's service benchmark (issue 4): `molt bench service` against a PostgreSQL server.
#
# Usage: bench/service.sh [molt bench service flags, e.g. --upload-mib 256 --rate 500]
# Env:   MOLT_BENCH_DATABASE_URL  PostgreSQL server for the queue figure (a scratch database is
#                                 created there and dropped); unset: scripts/test-services.sh
#                                 finds or starts one (a throw-away cluster runs with fsync off,
#                                 so prefer a real server for numbers to quote)
#        MOLT_BIN                 use this molt binary instead of building target/release/molt
#        OUT_DIR                  where results go (default target/bench/service-<UTC time>)
#
# Writes the JSON lines to $OUT_DIR/service.jsonl and the summary to $OUT_DIR/service.log.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

out="${OUT_DIR:-$root/target/bench/service-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"

if [[ -z "${MOLT_BIN:-}" ]]; then
    # --workspace: `-p api` would rebuild candle with another feature set.
    cargo build --release --workspace
    MOLT_BIN="$root/target/release/molt"
fi

if [[ -z "${MOLT_BENCH_DATABASE_URL:-}" ]]; then
    # shellcheck source=../scripts/test-services.sh
    source scripts/test-services.sh
    export MOLT_BENCH_DATABASE_URL="$MOLT_TEST_DATABASE_URL"
fi

{
    echo "machine: $(uname -srm); $(nproc) CPUs; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "command: $MOLT_BIN bench service $*"
} | tee "$out/service.log" >&2
"$MOLT_BIN" bench service "$@" > "$out/service.jsonl" 2> >(tee -a "$out/service.log" >&2)
echo "results in $out" >&2
