"""One error type for everything a user can get wrong."""

from __future__ import annotations


class SafeSteerError(Exception):
    """A user-facing error: ``str(e)`` is one line naming the culprit and the problem."""


def one_line(msg: object) -> str:
    """``msg`` with all whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(msg).split())
