#!/usr/bin/env bash
# Issue 13's Vision Mamba speed figures: `molt bench --shapes vim-tiny` and the PyTorch port of
# hustvl's Vim (bench/vim_bench.py) back to back on this machine, then a side-by-side table
# (bench/vim_report.py) with the share of the matmul peak.
#
# Usage: bench/vim.sh [--reps N] [--train-reps N] [--images B] [--quick]
#        --train-reps: PyTorch timed training steps per method (default 1: each takes minutes,
#                      its sequential scan under autograd is the slow part)
# Env:   THREADS (default 2), MOLT_BIN (skip the release build), OUT_DIR
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

threads="${THREADS:-2}"
reps=3
train_reps=1
images=8
quick=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --reps) reps="$2"; shift 2 ;;
        --train-reps) train_reps="$2"; shift 2 ;;
        --images) images="$2"; shift 2 ;;
        --quick) quick=(--quick); reps=1; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "bench/vim.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

out="${OUT_DIR:-$root/target/bench/vim-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
echo "results in $out" >&2
bash bench/setup.sh
if [[ -z "${MOLT_BIN:-}" ]]; then
    cargo build --release --workspace
    MOLT_BIN="$root/target/release/molt"
fi
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') — $(nproc) cores available"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
    echo "threads per side: $threads"
    echo "command: bench/vim.sh --reps $reps --train-reps $train_reps --images $images ${quick[*]:-}"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out/machine.txt"

status=0
if [[ ${#quick[@]} -eq 0 ]]; then
    echo "== molt bench --shapes vim-tiny" >&2
    RAYON_NUM_THREADS="$threads" "$MOLT_BIN" bench --shapes vim-tiny --metrics matmul,forward,train \
        --reps "$reps" --images "$images" > "$out/molt.jsonl" 2> >(tee "$out/molt.log" >&2) || status=1
fi
echo "== vim_bench.py" >&2
bench/.venv/bin/python bench/vim_bench.py --threads "$threads" --reps "$reps" --train-reps "$train_reps" \
    --batch "$images" "${quick[@]}" > "$out/pytorch.jsonl" 2> >(tee "$out/pytorch.log" >&2) || status=1
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
python3 bench/vim_report.py "$out/molt.jsonl" "$out/pytorch.jsonl" "$out/machine.txt" | tee "$out/report.md"
exit "$status"
