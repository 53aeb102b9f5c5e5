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
su postgres -c "psql -q -c \"ALTER ROLE sft LOGIN CREATEDB PASSWORD 'sft'\""
su postgres -c "psql -lqt | cut -d'|' -f1 | grep -qw sft_test || createdb -O sft sft_test"
# Check what the tests do: a password login as the test role over TCP (not the postgres superuser over the unix
# socket, which a broken pg_hba.conf or role password would not stop; the tests would then skip, not fail).
if ! PGPASSWORD=sft psql -h 127.0.0.1 -p 5432 -U sft -d sft_test -tAc 'SELECT 1' >/dev/null; then
    echo "services: cannot log in to sft_test as role sft over TCP on 127.0.0.1:5432 (check pg_hba.conf)" >&2
    exit 1
fi
echo "services: PostgreSQL $ver on 127.0.0.1:5432 (postgresql+psycopg://sft:sft@127.0.0.1:5432/sft_test), $(chromium --version 2>/dev/null || echo 'no chromium')"
