"""Errors that carry a message meant for the user: the CLIs print them in one line and exit non-zero."""


class PipelineError(RuntimeError):
    pass
