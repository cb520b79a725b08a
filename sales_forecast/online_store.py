"""Feast's PostgreSQL online store with a bulk write path.

feature_store.yaml: ``online_store: type: sales_forecast.online_store.BulkPostgreSQLOnlineStore`` with the keys of
``type: postgres``. Reads, the table layout (one row per entity key and feature, Feast's key serialization and
value protos), ``update`` and ``teardown`` are Feast's PostgreSQLOnlineStore unchanged, so Feast's
``get_online_features`` and the model server read what this writes. Only ``online_write_batch`` differs: Feast
upserts row by row (``executemany``, 370K statements for step 1's 11,583 series x 32 features); this one COPYs the
batch into a temporary table and upserts it with one ``INSERT ... ON CONFLICT DO UPDATE``, skipping rows whose
stored values are already the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from feast import FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _to_naive_utc, extract_text_and_num
from feast.infra.online_stores.postgres_online_store.postgres import (
    PostgreSQLOnlineStore,
    PostgreSQLOnlineStoreConfig,
    _table_id,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from psycopg import sql
from pydantic import field_validator

logger = logging.getLogger(__name__)

STORE_TYPE = "sales_forecast.online_store.BulkPostgreSQLOnlineStore"  # what feature_store.yaml names
KEY_COLUMNS = ("entity_key", "feature_name")
STAGING_TABLE = "feast_online_write_staging"  # a temporary table, dropped at the end of each write's transaction

WriteRows = list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]]


class BulkPostgreSQLOnlineStoreConfig(PostgreSQLOnlineStoreConfig):
    """The ``postgres`` online store keys, unchanged."""

    type: Literal["postgres"] = "postgres"  # type: ignore[assignment]

    @field_validator("type", mode="before")
    @classmethod
    def _postgres(cls, value: Any) -> Any:
        # Feast found this class through the yaml's type; from here on this is the postgres store to everything that
        # asks (Feast's PostgreSQLOnlineStore asserts type == "postgres", the model server's connection keeper
        # checks it). Feast builds the store from the config's class, not from this value.
        return "postgres" if value == STORE_TYPE else value


def online_columns(has_value_num: bool) -> list[tuple[str, str]]:
    """The columns Feast's PostgreSQLOnlineStore writes, in its order, with their staging types. Feast sends its
    naive UTC timestamps as ``timestamp``, which PostgreSQL casts to the table's ``timestamptz`` in the session's
    TimeZone; staging them as ``timestamp`` keeps that cast exactly."""
    return [("entity_key", "bytea"), ("feature_name", "text"), ("value", "bytea"), ("value_text", "text"),
            *([("value_num", "float8")] if has_value_num else []), ("vector_value", "bytea"),
            ("event_ts", "timestamp"), ("created_ts", "timestamp")]


def online_rows(config: RepoConfig, data: WriteRows, has_value_num: bool) -> list[tuple[Any, ...]]:
    """The table rows of ``data``, each valued as Feast's ``online_write_batch`` values it; for a key written twice
    only the last (an upsert per row keeps the last too, and one INSERT ... ON CONFLICT may not touch a row twice)."""
    version = config.entity_key_serialization_version
    keys = [serialize_entity_key(entity_key, entity_key_serialization_version=version) for entity_key, *_ in data]
    rows = []
    for key, (_, values, timestamp, created_ts) in zip(keys, data, strict=True):
        event_ts = _to_naive_utc(timestamp)
        created = _to_naive_utc(created_ts) if created_ts is not None else None
        for feature_name, value in values.items():
            text, number = extract_text_and_num(value, has_value_num)
            numeric = (number,) if has_value_num else ()
            rows.append((key, feature_name, value.SerializeToString(), text, *numeric, None, event_ts, created))
    if len(set(keys)) < len(keys):
        return list({(row[0], row[1]): row for row in rows}.values())
    return rows


def upsert_statement(table_name: str, columns: list[str]) -> sql.Composed:
    """Feast's upsert (ON CONFLICT DO UPDATE of every value column) of the staged rows that are not stored already,
    in key order, so concurrent writers of overlapping keys lock rows in one order."""
    target, staged = sql.Identifier(table_name), sql.Identifier(STAGING_TABLE)
    values = [c for c in columns if c not in KEY_COLUMNS]

    def qualified(table: sql.Identifier, names: list[str]) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("{}.{}").format(table, sql.Identifier(c)) for c in names)

    return sql.SQL(
        "INSERT INTO {target} ({names}) SELECT {staged_columns} FROM {staged} WHERE NOT EXISTS ("
        "SELECT FROM {target} WHERE {target}.entity_key = {staged}.entity_key "
        "AND {target}.feature_name = {staged}.feature_name AND ({stored}) IS NOT DISTINCT FROM ({new})) "
        "ORDER BY {staged}.entity_key, {staged}.feature_name "
        "ON CONFLICT (entity_key, feature_name) DO UPDATE SET {assign}"
    ).format(
        target=target, staged=staged, names=sql.SQL(", ").join(map(sql.Identifier, columns)),
        staged_columns=qualified(staged, columns), stored=qualified(target, values), new=qualified(staged, values),
        assign=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in values))


class BulkPostgreSQLOnlineStore(PostgreSQLOnlineStore):
    def online_write_batch(self, config: RepoConfig, table: FeatureView, data: WriteRows,
                           progress: Callable[[int], Any] | None) -> None:
        if config.online_store.vector_enabled:  # pgvector columns: Feast's own write
            super().online_write_batch(config, table, data, progress)
            return
        table_name = _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
        with self._get_conn(config) as conn, conn.cursor() as cur:
            try:
                has_value_num = self._check_table_has_value_num(cur, table_name, config)
                if getattr(config.online_store, "enable_openai_compatible_store", False) and not has_value_num:
                    logger.warning("enable_openai_compatible_store is True but value_num column not found in table "
                                   "'%s'. Run `feast apply` to add it. Writing without value_num.", table_name)
                columns = online_columns(has_value_num)
                names = [name for name, _ in columns]
                staging = sql.Identifier(STAGING_TABLE)
                cur.execute(sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP").format(
                    staging, sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
                                                for n, t in columns)))
                copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                    staging, sql.SQL(", ").join(map(sql.Identifier, names)))
                with cur.copy(copy_sql) as copy:
                    copy.set_types([t for _, t in columns])
                    for row in online_rows(config, data, has_value_num):
                        copy.write_row(row)
                cur.execute(upsert_statement(table_name, names))
                conn.commit()
            except BaseException:
                conn.rollback()  # the connection may be Feast's cached one: leave it usable
                raise
        if progress:
            progress(len(data))
