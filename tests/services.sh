#!/usr/bin/env bash
# Installs and starts what the PostgreSQL and browser tests need, from Debian's packages (run as root).
# Without it those tests skip themselves (unless CI is set, where they fail instead of hiding).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_ctlcluster >/dev/null || ! command -v chromium >/dev/null; then
    apt-get update -q
    apt-get install -y -q postgresql chromium
fi
ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_ctlcluster "$ver" main start 2>/dev/null || pg_ctlcluster "$ver" main status >/dev/null
# The tests make a database per test (CREATEDB) and need to log in over TCP on 127.0.0.1 only.
su postgres -c "psql -q -c \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sft') THEN CREATE ROLE sft LOGIN CREATEDB PASSWORD 'sft'; END IF; END \\\$\\\$;\""
su postgres -c "psql -q -c 'ALTER ROLE sft CREATEDB'"
su postgres -c "psql -lqt | cut -d'|' -f1 | grep -qw sft_test || createdb -O sft sft_test"
echo "services: PostgreSQL $ver on 127.0.0.1:5432 (postgresql+psycopg://sft:sft@127.0.0.1:5432/sft_test), $(chromium --version 2>/dev/null || echo 'no chromium')"
