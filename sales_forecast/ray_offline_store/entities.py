"""The entity set, from a DataFrame or a SQL query, as Arrow in its own row order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
from feast.errors import EntityTimestampInferenceException, FeastEntityDFMissingColumnsError, InvalidEntityType
from feast.infra.offline_stores.offline_utils import DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL

from sales_forecast.ray_offline_store.asof import NULL_TIME
from sales_forecast.ray_offline_store.reading import feast_types, read_arrow, utc_nanoseconds


@dataclass(frozen=True)
class EntitySet:
    table: pa.Table  # every column of the entity set, with Feast's PostgreSQL output types
    keys: pa.Table  # the same rows with the columns as given (the join compares these)
    timestamp_column: str
    timestamps_ns: np.ndarray  # UTC nanoseconds, NULL_TIME where missing

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def time_range(self) -> tuple[datetime, datetime] | None:
        valid = self.timestamps_ns[self.timestamps_ns != NULL_TIME]
        if valid.size == 0:
            return None
        low, high = pd.Timestamp(valid.min(), tz="UTC"), pd.Timestamp(valid.max(), tz="UTC")
        return low.to_pydatetime(warn=False), high.to_pydatetime(warn=False)


def timestamp_column(schema: pa.Schema) -> str:
    """Feast's rule: ``event_timestamp`` if present, else the only timestamp column."""
    if DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL in schema.names:
        return DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL
    stamps = [field.name for field in schema if pa.types.is_timestamp(field.type)]
    if len(stamps) != 1:
        raise EntityTimestampInferenceException(DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL)
    return stamps[0]


def check_columns(schema: pa.Schema, join_keys: set[str]) -> None:
    missing = join_keys - set(schema.names)
    if missing:
        raise FeastEntityDFMissingColumnsError(join_keys, missing)


def load_entities(entity_df: pd.DataFrame | str, connection: str, join_keys: set[str]) -> EntitySet:
    if isinstance(entity_df, pd.DataFrame):
        table = pa.Table.from_pandas(entity_df, preserve_index=False)
    elif isinstance(entity_df, str):
        table = read_arrow(connection, entity_df)
    else:
        raise InvalidEntityType(type(entity_df))
    check_columns(table.schema, join_keys)
    column = timestamp_column(table.schema)
    timestamps = entity_df[column] if isinstance(entity_df, pd.DataFrame) else table.column(column)
    return EntitySet(table=feast_types(table), keys=table.select(sorted(join_keys)), timestamp_column=column,
                     timestamps_ns=utc_nanoseconds(timestamps))
