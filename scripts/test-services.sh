# shellcheck shell=bash
# Test services for molt: PostgreSQL and an S3-speaking server (moto). SOURCE this file:
#
#     source scripts/test-services.sh
#
# It exports
#     MOLT_TEST_DATABASE_URL   postgres://postgres@127.0.0.1:PORT/postgres (trust auth)
#     MOLT_TEST_S3_ENDPOINT    http://127.0.0.1:PORT        (moto server)
#     MOLT_TEST_S3_BUCKET      molt-test                    (created here)
#     AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
#     AWS_ALLOW_HTTP=true AWS_ENDPOINT_URL=$MOLT_TEST_S3_ENDPOINT
# and stops whatever it started when the shell exits (an EXIT/INT/TERM trap calling
# `molt_test_services_cleanup`; a caller that sets its own EXIT trap must call that function
# itself).
#
# PostgreSQL: if MOLT_TEST_DATABASE_URL is already set it is used as is. Otherwise, if a
# server on 127.0.0.1:5432 accepts `postgres` without a password, that one is used; if not,
# a throw-away cluster is created with initdb (trust auth, fsync off) in a temporary
# directory on a free port — as user `postgres` when running as root, since initdb refuses
# to run as root.
#
# S3: if MOLT_TEST_S3_ENDPOINT is already set it is used as is. Otherwise moto's server runs
# from a virtualenv in ${MOLT_CACHE_DIR:-~/.cache/molt}/moto-venv (installed from PyPI on
# first use, reused afterwards) on a free port, and the bucket is created.

_molt_svc_log() { printf 'test-services: %s\n' "$*" >&2; }

_molt_svc_pg_dir=""
_molt_svc_pg_bin=""
_molt_svc_pg_user=""
_molt_svc_moto_pid=""
_molt_svc_moto_log=""
_molt_svc_cleaned=""

molt_test_services_cleanup() {
    [ -n "$_molt_svc_cleaned" ] && return 0
    _molt_svc_cleaned=1
    if [ -n "$_molt_svc_moto_pid" ]; then
        kill "$_molt_svc_moto_pid" 2>/dev/null || true
        wait "$_molt_svc_moto_pid" 2>/dev/null || true
        _molt_svc_log "stopped moto (pid $_molt_svc_moto_pid)"
    fi
    if [ -n "$_molt_svc_moto_log" ]; then
        rm -f "$_molt_svc_moto_log"
    fi
    if [ -n "$_molt_svc_pg_dir" ]; then
        if [ -n "$_molt_svc_pg_user" ]; then
            runuser -u "$_molt_svc_pg_user" -- "$_molt_svc_pg_bin/pg_ctl" -D "$_molt_svc_pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
        else
            "$_molt_svc_pg_bin/pg_ctl" -D "$_molt_svc_pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
        fi
        rm -rf "$_molt_svc_pg_dir"
        _molt_svc_log "stopped the throw-away PostgreSQL"
    fi
}

_molt_svc_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

_molt_svc_pg_bindir() {
    local initdb
    initdb="$(command -v initdb 2>/dev/null || true)"
    if [ -z "$initdb" ]; then
        initdb="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)"
    fi
    [ -n "$initdb" ] || return 1
    dirname "$(readlink -f "$initdb")"
}

_molt_svc_start_postgres() {
    local url="postgres://postgres@127.0.0.1:5432/postgres"
    # MOLT_TEST_OWN_POSTGRES=1 skips the shared server (to test the throw-away path).
    if [ "${MOLT_TEST_OWN_POSTGRES:-0}" != 1 ] && command -v psql >/dev/null 2>&1 &&
        PGCONNECT_TIMEOUT=3 psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1; then
        export MOLT_TEST_DATABASE_URL="$url"
        _molt_svc_log "using PostgreSQL on 127.0.0.1:5432"
        return 0
    fi
    _molt_svc_pg_bin="$(_molt_svc_pg_bindir)" || {
        _molt_svc_log "no PostgreSQL server binaries (initdb) found"
        return 1
    }
    local port dir
    port="$(_molt_svc_free_port)"
    dir="$(mktemp -d "${TMPDIR:-/tmp}/molt-pg.XXXXXX")"
    _molt_svc_pg_dir="$dir"
    local -a as_user=()
    if [ "$(id -u)" = 0 ]; then
        _molt_svc_pg_user=postgres
        chown postgres "$dir"
        as_user=(runuser -u postgres --)
    fi
    "${as_user[@]}" "$_molt_svc_pg_bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 \
        --no-instructions >"$dir/initdb.log" 2>&1 || {
        _molt_svc_log "initdb failed:"; cat "$dir/initdb.log" >&2; return 1
    }
    "${as_user[@]}" "$_molt_svc_pg_bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >/dev/null || {
        _molt_svc_log "PostgreSQL did not start:"; cat "$dir/server.log" >&2; return 1
    }
    export MOLT_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    _molt_svc_log "started a throw-away PostgreSQL on 127.0.0.1:$port (data in $dir)"
}

_molt_svc_install_moto() {
    local venv="$1"
    if [ -x "$venv/bin/moto_server" ]; then
        return 0
    fi
    _molt_svc_log "installing moto[server] into $venv (first run only)"
    mkdir -p "$(dirname "$venv")"
    (
        # One installer at a time when several runs start together.
        if command -v flock >/dev/null 2>&1; then
            exec 9>"$venv.lock"
            flock 9
        fi
        if [ ! -x "$venv/bin/moto_server" ]; then
            rm -rf "$venv"
            python3 -m venv "$venv" &&
                "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]>=5,<6"
        fi
    ) || {
        _molt_svc_log "could not install moto"
        rm -rf "$venv"
        return 1
    }
}

_molt_svc_start_moto() {
    local cache="${MOLT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/molt}"
    local venv="$cache/moto-venv"
    _molt_svc_install_moto "$venv" || return 1
    local port log i code up=""
    port="$(_molt_svc_free_port)"
    log="$(mktemp "${TMPDIR:-/tmp}/molt-moto.XXXXXX")"
    _molt_svc_moto_log="$log"
    "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
    _molt_svc_moto_pid=$!
    local endpoint="http://127.0.0.1:$port"
    for i in $(seq 1 100); do
        code="$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/" 2>/dev/null || true)"
        if [ -n "$code" ] && [ "$code" != "000" ]; then
            up=1
            break
        fi
        if ! kill -0 "$_molt_svc_moto_pid" 2>/dev/null; then
            _molt_svc_log "moto exited:"; cat "$log" >&2; _molt_svc_moto_pid=""; return 1
        fi
        sleep 0.2
    done
    if [ -z "$up" ]; then
        _molt_svc_log "moto did not answer on $endpoint"; cat "$log" >&2; return 1
    fi
    export MOLT_TEST_S3_ENDPOINT="$endpoint"
    _molt_svc_log "started moto on $endpoint (pid $_molt_svc_moto_pid, log $log)"
}

molt_test_services_start() {
    trap 'molt_test_services_cleanup' EXIT
    trap 'molt_test_services_cleanup; exit 130' INT
    trap 'molt_test_services_cleanup; exit 143' TERM

    if [ -z "${MOLT_TEST_DATABASE_URL:-}" ]; then
        _molt_svc_start_postgres || return 1
    else
        _molt_svc_log "using MOLT_TEST_DATABASE_URL from the environment"
    fi

    if [ -z "${MOLT_TEST_S3_ENDPOINT:-}" ]; then
        _molt_svc_start_moto || return 1
    else
        _molt_svc_log "using MOLT_TEST_S3_ENDPOINT from the environment"
    fi
    export MOLT_TEST_S3_BUCKET="${MOLT_TEST_S3_BUCKET:-molt-test}"
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
    export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
    export AWS_REGION="${AWS_REGION:-us-east-1}"
    export AWS_ALLOW_HTTP="${AWS_ALLOW_HTTP:-true}"
    export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-$MOLT_TEST_S3_ENDPOINT}"
    # Create the bucket (moto answers 200 if it already exists in us-east-1).
    if ! curl -fsS -o /dev/null -X PUT "$MOLT_TEST_S3_ENDPOINT/$MOLT_TEST_S3_BUCKET"; then
        _molt_svc_log "could not create bucket $MOLT_TEST_S3_BUCKET at $MOLT_TEST_S3_ENDPOINT"
        return 1
    fi
    _molt_svc_log "MOLT_TEST_DATABASE_URL=$MOLT_TEST_DATABASE_URL MOLT_TEST_S3_ENDPOINT=$MOLT_TEST_S3_ENDPOINT bucket=$MOLT_TEST_S3_BUCKET"
}

molt_test_services_start || {
    _molt_svc_log "failed to start the test services"
    molt_test_services_cleanup
    return 1 2>/dev/null || exit 1
}
