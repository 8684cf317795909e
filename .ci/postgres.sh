#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for the store tests and export AGENTSPEC_TEST_PG_URL
# (postgresql+psycopg://agentspec:agentspec@127.0.0.1:PORT/agentspec_test).
# Installs Debian's postgresql when it is missing (as root, or through sudo). Meant to be sourced
# (.ci/run does, and its `set -euo pipefail` applies); `bash .ci/postgres.sh` works too and prints
# the URL. The server runs until stopped: pg_ctl -D "$AGENTSPEC_PG_DIR/data" stop (as its owner).
# AGENTSPEC_PG_PORT picks the port (default: a free one).
_agentspec_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    _agentspec_root apt-get update -qq
    _agentspec_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
PG_PORT=${AGENTSPEC_PG_PORT:-$(python3 -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
AGENTSPEC_PG_DIR=$(mktemp -d /tmp/agentspec-pg.XXXXXX)
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root: it runs as the postgres user
    chown postgres "$AGENTSPEC_PG_DIR"
    _agentspec_pg() { runuser -u postgres -- "$@"; }
else
    _agentspec_pg() { "$@"; }
fi
_agentspec_pg "$PG_BIN/initdb" -D "$AGENTSPEC_PG_DIR/data" -U postgres -A trust >/dev/null
_agentspec_pg "$PG_BIN/pg_ctl" -D "$AGENTSPEC_PG_DIR/data" -l "$AGENTSPEC_PG_DIR/log" -w -o \
    "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $AGENTSPEC_PG_DIR -c max_connections=200" start >/dev/null
# a login role that may create databases (each store test makes a fresh one) and its database
"$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE ROLE agentspec LOGIN CREATEDB PASSWORD 'agentspec'" \
    -c "CREATE DATABASE agentspec_test OWNER agentspec"
export AGENTSPEC_PG_DIR
export AGENTSPEC_TEST_PG_URL="postgresql+psycopg://agentspec:agentspec@127.0.0.1:$PG_PORT/agentspec_test"
echo "PostgreSQL running for the tests: $AGENTSPEC_TEST_PG_URL (data and log in $AGENTSPEC_PG_DIR)"
