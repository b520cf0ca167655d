"""One error type for everything a user can get wrong."""

from __future__ import annotations

import sys


class SafeSteerError(Exception):
    """A user-facing error: ``str(e)`` is one line naming the culprit and the problem."""


def one_line(msg: object) -> str:
    """``msg`` with all whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(msg).split())


def print_or_fail(produce) -> int:
    """For small CLIs: print what ``produce()`` returns; a SafeSteerError becomes one line and exit 2."""
    try:
        print(produce(), end="")
    except SafeSteerError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
