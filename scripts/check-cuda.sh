#!/usr/bin/env bash
# Compile-check of the `cuda` feature on a machine without a GPU (not run by CI):
#   1. installs Debian's CUDA toolkit if nvcc is absent (scripts/install-cuda-toolkit.sh);
#   2. compiles every trainer/src/kernels/cuda/*.cu to PTX (compute_80, compute_90) and to
#      SASS (sm_80, sm_90: runs ptxas, reports registers and spills), checking each PTX has
#      its entry points;
#   3. builds the workspace with the feature (all targets) and runs clippy on it.
# Running the GPU tests needs a GPU: `cargo test -p trainer --features cuda --test cuda`.
# CUDA_COMPUTE_CAP (default 80) is what candle-kernels' build script needs without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-toolkit.sh
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for cu in trainer/src/kernels/cuda/*.cu; do
  name="$(basename "$cu" .cu)"
  for arch in 80 90; do
    nice -n 19 nvcc --ptx -O3 -arch="compute_$arch" -o "$out/$name.$arch.ptx" "$cu"
    entries="$(grep -c '^.visible .entry' "$out/$name.$arch.ptx")"
    [ "$entries" -gt 0 ] || { echo "$cu: no kernels in the compute_$arch PTX" >&2; exit 1; }
    nice -n 19 nvcc --cubin -O3 -arch="sm_$arch" --resource-usage -o "$out/$name.$arch.cubin" "$cu" 2>"$out/ptxas.log"
    spills="$(grep -c 'bytes spill stores' "$out/ptxas.log" || true)"
    worst="$(grep -o '[0-9]* bytes spill stores' "$out/ptxas.log" | sort -n | tail -1 || true)"
    echo "$name: compute_$arch PTX ($entries kernels), sm_$arch SASS ok; largest spill: ${worst:-none} ($spills kernels reported)"
  done
done
nice -n 19 cargo build --workspace --features api/cuda --all-targets
nice -n 19 cargo clippy --workspace --features api/cuda --all-targets -- -D warnings
echo "check-cuda: kernels, build and clippy with the cuda feature are OK"
