#!/usr/bin/env bash
# molt's speed benchmark (issue 2): `molt bench` and the PyTorch reference stack back to back,
# on the same machine, in one run, then a side-by-side table with ratios.
#
# Usage: bench/run.sh [--quick] [--shapes small,130m] [--reps N] [--sizes 1x512,4x128] [--methods]
#        --methods: also issue 3's table (every PEFT method's training step, 130m shape, 4×128)
# Env:   THREADS (default 2)  threads for both sides (RAYON_NUM_THREADS / torch.set_num_threads)
#        MOLT_BIN             use this molt binary instead of building target/release/molt
#        OUT_DIR              where results go (default target/bench/<UTC time>)
#
# Each shape runs in a fresh process on each side (molt small, PyTorch small, molt 130m,
# PyTorch 130m), so one shape's heap does not inflate the next one's peak memory, and the two
# sides of a shape run close together in time under similar machine load.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

threads="${THREADS:-2}"
shapes="small,130m"
methods=0
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) extra+=(--quick); shift ;;
        --methods) methods=1; shift ;;
        --shapes) shapes="$2"; shift 2 ;;
        --reps|--sizes) extra+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

out="${OUT_DIR:-$root/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
echo "results in $out" >&2

bash bench/setup.sh

if [[ -z "${MOLT_BIN:-}" ]]; then
    # --workspace: `-p api` would rebuild candle with another feature set.
    cargo build --release --workspace
    MOLT_BIN="$root/target/release/molt"
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') — $(nproc) cores available, $(lscpu | sed -n 's/^Thread(s) per core: *//p') thread(s) per core"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
    echo "threads per side: $threads"
    echo "command: bench/run.sh${extra[*]:+ ${extra[*]}} --shapes $shapes (THREADS=$threads)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out/machine.txt"

: > "$out/molt.jsonl"
: > "$out/pytorch.jsonl"
status=0
IFS=',' read -ra shape_list <<< "$shapes"
for s in "${shape_list[@]}"; do
    echo "== molt bench --shapes $s" >&2
    RAYON_NUM_THREADS="$threads" "$MOLT_BIN" bench --shapes "$s" "${extra[@]}" \
        >> "$out/molt.jsonl" 2> >(tee -a "$out/molt.log" >&2) || status=1
    echo "== pytorch_bench.py --shapes $s" >&2
    bench/.venv/bin/python bench/pytorch_bench.py --shapes "$s" --threads "$threads" "${extra[@]}" \
        >> "$out/pytorch.jsonl" 2> >(tee -a "$out/pytorch.log" >&2) || status=1
done
if [[ "$methods" == 1 ]]; then
    echo "== molt bench --metrics methods --shapes 130m --sizes 4x128" >&2
    reps=()
    [[ " ${extra[*]} " == *" --quick "* ]] && reps=(--reps 1)
    RAYON_NUM_THREADS="$threads" "$MOLT_BIN" bench --metrics methods --shapes 130m --sizes 4x128 "${reps[@]}" \
        >> "$out/molt.jsonl" 2> >(tee -a "$out/molt.log" >&2) || status=1
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"

python3 bench/report.py "$out/molt.jsonl" "$out/pytorch.jsonl" "$out/machine.txt" | tee "$out/report.md"
exit "$status"
