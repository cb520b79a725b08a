"""Shared pieces of the numbered scripts: argument types, environment defaults and one-line error reporting."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sales_forecast.errors import ConfigError, PipelineError, first_line

if TYPE_CHECKING:
    from sales_forecast.config import ShapeDefaults

T = TypeVar("T")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value}")
    return value


def add_shape_arguments(parser: argparse.ArgumentParser, defaults: ShapeDefaults, weeks_flag: str, weeks_help: str,
                        scope: str = "") -> None:
    """Step 1's data shape: --stores, --depts, the weeks flag, --seed, defaulting to their environment variables."""
    parser.add_argument("--stores", type=positive_int, default=defaults.stores, help=f"{scope}(SALES_STORES)")
    parser.add_argument("--depts", type=positive_int, default=defaults.depts, help=f"{scope}(SALES_DEPTS)")
    parser.add_argument(weeks_flag, type=positive_int, default=defaults.weeks,
                        help=f"{scope}{weeks_help} (SALES_WEEKS)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"{scope}(SALES_SEED)")


def from_environment(parser: argparse.ArgumentParser, read: Callable[[], T]) -> T:
    """Defaults read from the environment, refused like a bad flag (usage line, exit 2) when invalid."""
    try:
        return read()
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # parser.error exits


def _database_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    import sqlalchemy.exc
    from adbc_driver_manager import Error as AdbcError

    return psycopg.Error, sqlalchemy.exc.OperationalError, AdbcError


def _database_cause(exc: BaseException) -> BaseException | None:
    """``exc`` if it is a database error; or, when a Ray task failed, the task's own exception if that is one (Ray
    raises a wrapper of it, named for the task, that keeps it as ``cause``, wrappers within wrappers)."""
    errors = _database_errors()
    seen: set[int] = set()
    error: object = exc
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        wrapped = getattr(error, "cause", None)
        if isinstance(error, errors) and not isinstance(wrapped, errors):
            return error
        error = wrapped
    return None


def run_cli(main: Callable[[], None]) -> None:
    """Run ``main``; known failures print one line on stderr and exit non-zero instead of a traceback."""
    try:
        main()
        # The command is done: spare the interpreter's last garbage collections over every object still alive (0.6 s
        # of a 1 s exit once Feast is imported); atexit handlers and the OS still clean up.
        gc.freeze()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        cause = _database_cause(exc)
        if cause is None:
            raise
        print(f"error: database: {first_line(cause)}", file=sys.stderr)
        sys.exit(1)
