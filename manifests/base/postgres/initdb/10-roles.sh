#!/usr/bin/env bash
# Runs once, when PostgreSQL initialises an empty volume (/docker-entrypoint-initdb.d of the official image, which
# sources it: it runs under the entrypoint's `set -Eeo pipefail`, so it sets no options of its own). The entrypoint
# has created the superuser POSTGRES_USER (Secret postgres-superuser, used by nothing but this server) and the
# database POSTGRES_DB (feast), owned by it. This script adds two plain login roles, from their own Secrets:
# - PIPELINE_DB_USER (Secret postgres-credentials, the pipeline's pods): owner of database POSTGRES_DB;
# - MLFLOW_DB_USER (Secret mlflow-db-credentials, the MLflow server only): owner of database mlflow;
# and revokes CONNECT and TEMPORARY on both databases from PUBLIC, so each role reaches its own database only:
# the pipeline cannot change MLflow's registry (the champion alias) in SQL, past MLflow's authentication.
# psql quotes the values (:'var' as a literal, :"var" as an identifier), so any name and password work. The
# connection is the entrypoint's: its socket-only server, as the superuser (PGPASSWORD is set during init).
for var in POSTGRES_USER POSTGRES_DB PIPELINE_DB_USER PIPELINE_DB_PASSWORD MLFLOW_DB_USER MLFLOW_DB_PASSWORD; do
  if [ -z "${!var:-}" ]; then
    echo "10-roles.sh: $var is empty" >&2
    exit 1
  fi
done
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc --dbname "$POSTGRES_DB" \
  --set feast_db="$POSTGRES_DB" \
  --set pipeline_user="$PIPELINE_DB_USER" --set pipeline_password="$PIPELINE_DB_PASSWORD" \
  --set mlflow_user="$MLFLOW_DB_USER" --set mlflow_password="$MLFLOW_DB_PASSWORD" <<'EOSQL'
CREATE ROLE :"pipeline_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'pipeline_password';
CREATE ROLE :"mlflow_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'mlflow_password';
-- The owner of a database owns its public schema (pg_database_owner) and may create tables there.
ALTER DATABASE :"feast_db" OWNER TO :"pipeline_user";
CREATE DATABASE mlflow OWNER :"mlflow_user";
REVOKE ALL ON DATABASE :"feast_db" FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
EOSQL
