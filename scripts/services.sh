#!/usr/bin/env bash
# Services the ledger tests need beyond Python: a PostgreSQL server (Debian's
# packages) and anvil, a local EVM dev chain (npm's @foundry-rs/anvil, installed
# into .tools/, which ignores itself in git). Source it so the exports reach the
# tests:   source scripts/services.sh
# Run as root on Debian 12 (CI). Elsewhere it does what it can and says what it
# skipped; the tests that need a missing service skip with the reason.
# Chromium (Debian's package) for the console's browser tests, which Playwright
# drives through executable_path: it cannot download its own browsers here.
# Exports: TEESHARD_TEST_POSTGRES_URL, TEESHARD_ANVIL, TEESHARD_CHROMIUM.

_teeshard_services() {
    local root db_user=teeshard db_name=teeshard_test db_password=teeshard
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

    # -- PostgreSQL ------------------------------------------------------------------
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "services: installing PostgreSQL from Debian packages"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        else
            echo "services: PostgreSQL is not installed and this is not root on Debian: skipping it"
        fi
    fi
    local version
    version="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$version" ] && [ "$(id -u)" = 0 ]; then
        if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$version main"; then
            pg_createcluster "$version" main >/dev/null
        fi
        if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -qx online; then
            pg_ctlcluster "$version" main start
        fi
        local port
        port="$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $3}')"
        runuser -u postgres -- psql -q -p "$port" -v ON_ERROR_STOP=1 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$db_user') THEN
    CREATE ROLE $db_user LOGIN PASSWORD '$db_password' CREATEDB;
  END IF;
END \$\$;
SQL
        if ! runuser -u postgres -- psql -p "$port" -tAc "SELECT 1 FROM pg_database WHERE datname='$db_name'" | grep -q 1; then
            runuser -u postgres -- createdb -p "$port" -O "$db_user" "$db_name"
        fi
        export TEESHARD_TEST_POSTGRES_URL="postgresql://$db_user:$db_password@127.0.0.1:$port/$db_name"
        echo "services: PostgreSQL $version on port $port, database $db_name"
    fi

    # -- Chromium (the console's browser tests) ----------------------------------------
    if ! command -v chromium >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "services: installing chromium from Debian packages"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
        else
            echo "services: chromium is not installed and this is not root on Debian: browser tests skip"
        fi
    fi
    if command -v chromium >/dev/null; then
        export TEESHARD_CHROMIUM="$(command -v chromium)"
        echo "services: $("$TEESHARD_CHROMIUM" --version 2>/dev/null | head -n 1) at $TEESHARD_CHROMIUM"
    fi

    # -- anvil -----------------------------------------------------------------------
    local tools="$root/.tools"
    mkdir -p "$tools"
    [ -f "$tools/.gitignore" ] || echo '*' > "$tools/.gitignore"
    if [ ! -x "$tools/node_modules/.bin/anvil" ]; then
        if command -v npm >/dev/null; then
            echo "services: installing anvil from npm into .tools/"
            npm install --prefix "$tools" --no-audit --no-fund --silent @foundry-rs/anvil@1.7.1
        else
            echo "services: npm is not installed: skipping anvil"
        fi
    fi
    local anvil
    # The platform package carries the binary; the .bin wrapper needs node on PATH.
    anvil="$(ls "$tools"/node_modules/@foundry-rs/anvil-*/bin/anvil 2>/dev/null | head -n 1 || true)"
    [ -n "$anvil" ] || anvil="$tools/node_modules/.bin/anvil"
    if [ -x "$anvil" ] && "$anvil" --version >/dev/null 2>&1; then
        export TEESHARD_ANVIL="$anvil"
        echo "services: $("$anvil" --version | head -n 1) at $anvil"
    else
        echo "services: anvil is not runnable: the anvil tests will skip"
    fi
}
_teeshard_services
unset -f _teeshard_services
