"""The libpq connection string of the offline store, with the options of Feast's own connections."""

from __future__ import annotations

from feast.infra.utils.postgres.connection_utils import _get_conn_kwargs, _get_conninfo
from feast.infra.utils.postgres.postgres_config import PostgreSQLConfig
from psycopg.conninfo import make_conninfo


def conninfo(config: PostgreSQLConfig, parallel_query: bool = True) -> str:
    """sslmode, ssl files, search_path and keepalives as Feast sets them, for ADBC (libpq) connections.

    ``parallel_query=False`` is for the partition reads: Ray already runs one per CPU, and with PostgreSQL's
    parallel workers the planner picks a parallel scan of the whole table over an index range scan of the
    partition's keys (measured: each of 13 partitions then read the full 6M-row table).
    """
    options = {name: value for name, value in _get_conn_kwargs(config).items() if value is not None}
    if not parallel_query:
        options["options"] = f"{options.get('options', '')} -c max_parallel_workers_per_gather=0".strip()
    if config.keepalives_idle is not None:
        options["keepalives_idle"] = config.keepalives_idle
    return make_conninfo(_get_conninfo(config), **options)
