#!/usr/bin/env bash
# The one test command (README, .ci/run): lint, then every test of the workspace against
# SQLite and PostgreSQL, local files and a real S3-speaking server (moto), the dashboard in
# headless Chromium, then openapi.yaml
# against a running server (scripts/schemathesis.sh), then the README's walk-through from a
# fresh clone (scripts/walkthrough.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# Starts PostgreSQL (if none answers on 127.0.0.1:5432) and a moto S3 server, exports
# MOLT_TEST_DATABASE_URL / MOLT_TEST_S3_ENDPOINT, and stops what it started on exit.
# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh

# The dashboard's browser test (api/tests/dashboard.rs) drives Debian's Chromium through
# chromedriver; install both when absent.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y --no-install-recommends chromium chromium-driver ||
    { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends chromium chromium-driver; }
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
bash scripts/schemathesis.sh
bash scripts/walkthrough.sh
