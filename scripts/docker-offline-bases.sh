#!/usr/bin/env bash
# For machines that reach Debian's mirror but not Docker Hub: builds local stand-ins for the
# Dockerfile's two base images, tagged with their names, so `docker build` works unchanged.
#   debian:bookworm-slim  <- debootstrap --variant=minbase bookworm
#   rust:1.95-bookworm    <- that + gcc/g++/make/pkg-config/git/curl + this machine's rustup
#                            toolchain (bin and lib only), laid out as the official image
#                            (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo)
# Extra CA certificates of this machine (/usr/local/share/ca-certificates/*.crt, e.g. a TLS
# proxy's) are trusted inside the build image too, so cargo can fetch crates.
# Needs root, debootstrap and a Docker daemon.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
TOOLCHAIN=${TOOLCHAIN:-$(rustc --print sysroot)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR"
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb
tar -C "$work/rootfs" -c . | docker import - debian:bookworm-slim

ctx="$work/ctx"
mkdir -p "$ctx/tc" "$ctx/certs"
cp -a "$TOOLCHAIN/bin" "$TOOLCHAIN/lib" "$ctx/tc/"
rm -rf "$ctx/tc/lib/rustlib/src"
cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2> /dev/null || true
cat > "$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev make \
    ca-certificates pkg-config git curl && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY tc /usr/local/rustup/toolchains/local
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && for b in cargo rustc rustdoc; do \
    ln -s /usr/local/rustup/toolchains/local/bin/$b /usr/local/cargo/bin/$b; done \
    && cargo --version && rustc --version
EOF
docker build --network host -t rust:1.95-bookworm "$ctx"
echo "docker-offline-bases: debian:bookworm-slim and rust:1.95-bookworm are local stand-ins now"
