#!/usr/bin/env bash
# Creates bench/.venv with the PyTorch reference stack used by bench/pytorch_bench.py.
#
# Only PyPI is reachable from the project's machines, so torch comes from PyPI's default wheel
# (it pulls the CUDA runtime libraries, several GB; the benchmark itself runs on CPU only).
# Versions are pinned so that the reference numbers in BENCHMARKS.md can be reproduced.
#
# Idempotent: an existing venv whose pinned packages import is reused as it is.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

TORCH_VERSION="2.15.0"
TRANSFORMERS_VERSION="5.23.0"
PEFT_VERSION="0.21.2"
SAFETENSORS_VERSION="0.8.0"

check() {
    "$venv/bin/python" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" "$PEFT_VERSION" "$SAFETENSORS_VERSION" <<'EOF'
import sys
import importlib.metadata as md
want = dict(zip(["torch", "transformers", "peft", "safetensors"], sys.argv[1:]))
for name, version in want.items():
    have = md.version(name)
    # torch may carry a local suffix such as "+cu128"; compare the public part.
    if have.split("+")[0] != version:
        sys.exit(f"{name} {have} installed, {version} wanted")
import torch, transformers, peft, safetensors  # noqa: F401  (import check)
EOF
}

if [[ -x "$venv/bin/python" ]] && check 2>/dev/null; then
    echo "bench/.venv is ready (reused)" >&2
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --disable-pip-version-check \
    "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "peft==$PEFT_VERSION" \
    "safetensors==$SAFETENSORS_VERSION"
check
echo "bench/.venv is ready" >&2
