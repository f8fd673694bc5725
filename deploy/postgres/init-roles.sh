#!/bin/sh
# Run once by the postgres image on the database's first start (docker-entrypoint-initdb.d),
# as POSTGRES_USER, the owner, who also applies the migrations (MIGRATION_DATABASE_URL).
# Creates the runtime role `app` with POSTGRES_APP_PASSWORD and grants it rows only
# (runtime-grants.sql). A volume initialised before this script existed has neither: create
# the role and run the grants by hand (docs/operations.md, "Least privilege").
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v app_password="$POSTGRES_APP_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE app LOGIN PASSWORD %L', :'app_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') \gexec
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v runtime_role=app -f /deploy/postgres/runtime-grants.sql
