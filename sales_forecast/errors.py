"""Errors that carry a message meant for the user: the CLIs print them in one line and exit non-zero."""


class PipelineError(RuntimeError):
    pass


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
