"""Processes a test starts: a check script run in a child, and finding and stopping the processes a
test started, by a marker in their environment (children inherit it, even once re-parented)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child_result(script: str, *args: str, timeout: float = 600) -> dict:
    """Run ``script`` (Python source) in a child process from the repository root and return the JSON
    it prints after ``RESULT``. An in-process vLLM engine sets process-wide state (seeds, a torch
    distributed group) that must not leak into the other tests, hence the child."""
    p = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.split("RESULT", 1)[1])


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
