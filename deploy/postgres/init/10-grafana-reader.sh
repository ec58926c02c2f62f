#!/bin/sh
# Runs once, when the PostgreSQL volume is created: a read-only role for Grafana's datasource.
# The collector creates its tables later (Alembic migrations as $POSTGRES_USER), so the grant is a
# default privilege on the tables that role creates.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE grafana_reader LOGIN PASSWORD '${MOXCO_GRAFANA_DB_PASSWORD}';
GRANT CONNECT ON DATABASE "${POSTGRES_DB}" TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE "${POSTGRES_USER}" IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
SQL
