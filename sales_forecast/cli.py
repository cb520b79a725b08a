"""Shared pieces of the numbered scripts: argument types and one-line error reporting."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sales_forecast.errors import PipelineError, first_line


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _database_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    import sqlalchemy.exc
    from adbc_driver_manager import Error as AdbcError

    return psycopg.Error, sqlalchemy.exc.OperationalError, AdbcError


def run_cli(main: Callable[[], None]) -> None:
    """Run ``main``; known failures print one line on stderr and exit 1 instead of a traceback."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except _database_errors() as exc:
        print(f"error: database: {first_line(exc)}", file=sys.stderr)
        sys.exit(1)
