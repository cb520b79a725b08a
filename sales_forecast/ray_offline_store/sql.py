"""The pushed-down read of one partition: the view's columns, its time window and its key range.

Output columns are renamed positionally (__k0.., __ts, __created, __f0..) so a feature that shares a name
with a key or a timestamp column cannot collide.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg import sql

from sales_forecast.ray_offline_store.columns import CREATED, TS, feature_column, key_column
from sales_forecast.ray_offline_store.partitioning import KeyRange
from sales_forecast.ray_offline_store.plan import ViewPlan

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class TimeWindow:
    """Feature rows a partition can use: timestamp in [low, high] (UTC ns); low None: unbounded."""

    low_ns: int | None
    high_ns: int


def _timestamp(ns: int, round_up: bool) -> sql.Composable:
    # PostgreSQL keeps microseconds: the whole-microsecond bound that keeps exactly the same rows
    micros = -(-ns // 1000) if round_up else ns // 1000
    return sql.Literal(_EPOCH + dt.timedelta(microseconds=micros))


def _row(items: list[sql.Composable]) -> sql.Composable:
    return items[0] if len(items) == 1 else sql.SQL("ROW({})").format(sql.SQL(", ").join(items))


def _key_predicate(plan: ViewPlan, key_range: KeyRange, text_keys: tuple[bool, ...]) -> sql.Composable:
    """``keys >= low AND keys <= high``: a plain comparison for one key (served by the (key, timestamp) index),
    a row comparison for several; text compares in code point order, the order of Python's sort."""
    columns = [sql.SQL('({} COLLATE "C")').format(sql.Identifier(name)) if text else sql.Identifier(name)
               for name, text in zip(plan.source_keys, text_keys, strict=True)]
    return sql.SQL("{row} >= {low} AND {row} <= {high}").format(
        row=_row(columns), low=_row([sql.Literal(v) for v in key_range.low]),
        high=_row([sql.Literal(v) for v in key_range.high]))


def feature_query(plan: ViewPlan, window: TimeWindow | None, key_range: KeyRange | None,
                  text_keys: tuple[bool, ...]) -> str:
    """SELECT the view's keys, timestamps and requested features; ``window`` None selects no rows."""
    ts = sql.Identifier(plan.timestamp_field)
    selected = [sql.SQL("{} AS {}").format(sql.Identifier(name), sql.Identifier(key_column(i)))
                for i, name in enumerate(plan.source_keys)]
    selected.append(sql.SQL("{} AS {}").format(ts, sql.Identifier(TS)))
    if plan.created_timestamp_column:
        selected.append(sql.SQL("{} AS {}").format(sql.Identifier(plan.created_timestamp_column),
                                                   sql.Identifier(CREATED)))
    selected += [sql.SQL("{} AS {}").format(sql.Identifier(name), sql.Identifier(feature_column(i)))
                 for i, name in enumerate(plan.features)]

    conditions: list[sql.Composable] = []
    if window is None:
        conditions.append(sql.SQL("FALSE"))
    else:
        conditions.append(sql.SQL("{} <= {}").format(ts, _timestamp(window.high_ns, round_up=False)))
        if window.low_ns is not None:
            conditions.append(sql.SQL("{} >= {}").format(ts, _timestamp(window.low_ns, round_up=True)))
    if key_range is not None:
        conditions.append(_key_predicate(plan, key_range, text_keys))
    query = sql.SQL("SELECT {columns} FROM {source} AS source WHERE {conditions}").format(
        columns=sql.SQL(", ").join(selected),
        source=sql.SQL(plan.source_sql),
        conditions=sql.SQL(" AND ").join(conditions),
    )
    return query.as_string()
