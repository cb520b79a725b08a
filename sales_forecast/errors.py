"""Errors that carry a message meant for the user: the CLIs print them in one line and exit non-zero."""


class PipelineError(RuntimeError):
    """A failure the user can act on (a service down, missing data, a rejected model): one line, exit 1."""

    exit_code = 1


class ConfigError(PipelineError):
    """A bad setting (an environment variable or a flag's default): one line, exit 2 like a bad flag."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
