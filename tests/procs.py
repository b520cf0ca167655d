"""Finding and stopping the processes a test started, by a marker in their environment (children
inherit it, even once re-parented)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or a zombie
        return False


def pids_with_env(entry: str) -> list[int]:
    e = entry.encode()
    return [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and int(p) != os.getpid() and environ_has(int(p), e)
    ]


def kill_marked(entry: str, grace: float = 10.0) -> None:
    """SIGTERM every process whose environment holds ``entry``, SIGKILL what is left after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = pids_with_env(entry)
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids_with_env(entry) and time.monotonic() < deadline:
            time.sleep(0.2)
