"""The backward as-of join on plain arrays: for each entity row, the feature row Feast's join would pick.

A feature row qualifies for an entity row when the keys are equal (no NULL key matches anything), its
timestamp is <= the entity timestamp and, with a ttl, >= entity timestamp - ttl. Among qualifying rows the
latest timestamp wins, then the latest created timestamp, as in Feast's SQL join.

Timestamps are int64 nanoseconds since the epoch (UTC); ``NULL_TIME`` marks a missing one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

NO_MATCH = -1
NULL_TIME = np.iinfo(np.int64).min  # what NaT is in int64 nanoseconds


def _dense_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    encoded = column.dictionary_encode()
    cardinality = len(encoded.chunk(0).dictionary) if encoded.num_chunks else 0
    indices = pa.chunked_array([chunk.indices for chunk in encoded.chunks], pa.int32())
    return indices.fill_null(-1).to_numpy().astype(np.int64), cardinality


def key_codes(entity_keys: Sequence[pa.ChunkedArray], feature_keys: Sequence[pa.ChunkedArray],
              ) -> tuple[np.ndarray, np.ndarray]:
    """Dense int64 codes for key tuples, equal exactly when every key value is equal; -1 where a key is NULL.

    Each column is encoded on its own (entity values cast to the feature column's type) and the codes are
    combined pairwise, re-encoding after each step so the code never overflows: (1, 12) and (11, 2) stay
    distinct, unlike a glued string.
    """
    n_entities = len(entity_keys[0]) if entity_keys else 0
    n_features = len(feature_keys[0]) if feature_keys else 0
    if not entity_keys:  # a view without entities joins on time alone
        return np.zeros(n_entities, np.int64), np.zeros(n_features, np.int64)
    combined: np.ndarray | None = None
    for entity_column, feature_column in zip(entity_keys, feature_keys, strict=True):
        both = pa.chunked_array(entity_column.cast(feature_column.type).chunks + feature_column.chunks,
                                feature_column.type)
        codes, cardinality = _dense_codes(both)
        if combined is None:
            combined = codes
            continue
        null = (combined < 0) | (codes < 0)
        combined, _ = _dense_codes(pa.chunked_array([np.where(null, 0, combined * cardinality + codes)]))
        combined[null] = -1
    assert combined is not None
    return combined[:n_entities], combined[n_entities:]


def asof_match(
    entity_codes: np.ndarray,
    entity_ts: np.ndarray,
    feature_codes: np.ndarray,
    feature_ts: np.ndarray,
    feature_created: np.ndarray | None,
    ttl_ns: int | None,
) -> np.ndarray:
    """For each entity row, the index of the feature row it joins to, or NO_MATCH.

    Feature rows are ordered by (key, timestamp, created); (key, timestamp) is packed into one int64 (the key
    code times the number of distinct timestamps plus the timestamp's rank), so one searchsorted finds, for
    every entity row, the last feature row at or before it with the same key.
    """
    result = np.full(len(entity_codes), NO_MATCH, dtype=np.int64)
    usable = (feature_codes >= 0) & (feature_ts != NULL_TIME)
    if not usable.all():
        kept = np.flatnonzero(usable)
        inner = asof_match(entity_codes, entity_ts, feature_codes[kept], feature_ts[kept],
                           None if feature_created is None else feature_created[kept], ttl_ns)
        return np.where(inner >= 0, kept[np.maximum(inner, 0)], NO_MATCH)
    if len(feature_codes) == 0 or len(entity_codes) == 0:
        return result

    times, time_rank = np.unique(np.concatenate([feature_ts, entity_ts]), return_inverse=True)
    span = np.int64(len(times))
    feature_packed = feature_codes * span + time_rank[: len(feature_ts)]
    entity_packed = entity_codes * span + time_rank[len(feature_ts):]

    if feature_created is None:
        order = np.argsort(feature_packed, kind="stable")
    else:
        order = np.lexsort((feature_created, feature_packed))
    sorted_packed = feature_packed[order]

    candidate = np.searchsorted(sorted_packed, entity_packed, side="right") - 1
    found = candidate >= 0
    picked = order[np.maximum(candidate, 0)]
    found &= feature_codes[picked] == entity_codes
    found &= (entity_codes >= 0) & (entity_ts != NULL_TIME)
    if ttl_ns:
        found &= feature_ts[picked] >= entity_ts - ttl_ns
    result[found] = picked[found]
    return result
