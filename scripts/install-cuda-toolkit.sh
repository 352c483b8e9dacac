#!/usr/bin/env bash
# Installs Debian's CUDA toolkit (nvcc 11.8 + libs + g++-11 host compiler) if nvcc is absent.
# The toolkit lives in Debian's contrib/non-free components, which the base image does not list.
set -euo pipefail
if command -v nvcc >/dev/null 2>&1; then
  exit 0
fi
src=/etc/apt/sources.list.d/molt-cuda.sources
if [ ! -e "$src" ]; then
  cat > "$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
nice -n 19 apt-get update
DEBIAN_FRONTEND=noninteractive nice -n 19 apt-get install -y --no-install-recommends nvidia-cuda-toolkit
nvcc --version
