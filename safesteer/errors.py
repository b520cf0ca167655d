"""One error type for everything a user can get wrong, and the one-line CLI report of it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

T = TypeVar("T")


class SafeSteerError(Exception):
    """A user-facing error: ``str(e)`` is one line naming the culprit and the problem."""


def one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def cli_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn user errors into one ``error: ...`` line and exit code 2 (a traceback with ``SAFESTEER_DEBUG=1``)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SafeSteerError, FileNotFoundError, PermissionError) as e:
            if os.environ.get("SAFESTEER_DEBUG") or _hydra_debug():
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def _hydra_debug() -> bool:
    return any(a in ("debug=true", "debug=True", "++debug=true") for a in sys.argv[1:])
