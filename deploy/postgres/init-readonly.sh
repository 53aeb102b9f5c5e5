#!/bin/bash
# Runs once, when the PostgreSQL volume is first initialised: a role that can read the studies, nothing else.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE ${DASHBOARD_DB_USER} LOGIN PASSWORD '${DASHBOARD_DB_PASSWORD}';
GRANT CONNECT ON DATABASE ${POSTGRES_DB} TO ${DASHBOARD_DB_USER};
GRANT USAGE ON SCHEMA public TO ${DASHBOARD_DB_USER};
GRANT SELECT ON ALL TABLES IN SCHEMA public TO ${DASHBOARD_DB_USER};
-- tables Optuna creates later (on the first worker's start) are readable too
ALTER DEFAULT PRIVILEGES FOR ROLE ${POSTGRES_USER} IN SCHEMA public GRANT SELECT ON TABLES TO ${DASHBOARD_DB_USER};
SQL
