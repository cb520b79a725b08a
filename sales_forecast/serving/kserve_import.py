"""Import kserve without letting it read our command line.

``import kserve`` parses ``sys.argv`` with kserve's server parser, and argparse takes abbreviations: a foreign
``--timeout 30`` (03_inference.py, pytest-timeout) silently becomes ``--timeout-keep-alive 30``. Code that only
builds kserve objects imports it inside ``hidden_argv()``; the model server itself wants the parse.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hidden_argv() -> Iterator[None]:
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved
