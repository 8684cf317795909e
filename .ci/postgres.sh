#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for the store tests and export AGENTSPEC_TEST_PG_URL.
# Installs Debian's postgresql when it is missing. Sourced by .ci/run (whose `set -euo pipefail` applies).
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
PG_PORT=${AGENTSPEC_PG_PORT:-55432}
PG_DIR=$(mktemp -d /tmp/agentspec-pg.XXXXXX)
chown postgres "$PG_DIR"
runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust >/dev/null
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c max_connections=200 -c fsync=on" start >/dev/null
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres agentspec_test
export AGENTSPEC_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/agentspec_test"
echo "PostgreSQL running for the tests: $AGENTSPEC_TEST_PG_URL (data in $PG_DIR)"
