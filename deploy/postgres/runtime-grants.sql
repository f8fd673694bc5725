-- What the runtime role (the api, workers and batch: DATABASE_URL) may do: read and write
-- rows, and nothing else. No DDL, no TRUNCATE, no ownership: a bug or an injected statement
-- in a running process cannot drop or alter a table. The schema's owner
-- (MIGRATION_DATABASE_URL) applies the migrations.
--
-- Run by the owner, in the application's database, once the runtime role exists and before
-- or after the migrations (the defaults below cover the tables later migrations create, when
-- the same owner creates them):
--   psql -v ON_ERROR_STOP=1 -v runtime_role=app -d ecommerce -f runtime-grants.sql
-- docker compose runs it on the database's first start (init-roles.sh).

-- Nobody but the owner creates objects in the schema (the default since PostgreSQL 15).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"runtime_role";

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"runtime_role";
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO :"runtime_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"runtime_role";
