"""What the benchmark's systems share: the composed config, the step schedule, and the result file.

A system process gets a *spec* (a JSON file written by the runner) naming the Hydra overrides that
define the workload, the number of warm-up and measured steps, and where to write its result. The
config is composed from ``conf/`` with the same overrides the pipeline gets, so every system reads the
same prompts, samples, lengths, loss, learning rate and schedule.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from safesteer.paths import atomic_write_json


def compose(overrides: list[str], check: bool = True):
    """The run config for ``overrides`` (as ``python -m safesteer.run`` would see it), validated."""
    from safesteer import config

    return config.compose(overrides, check=check)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest d <= cap with n % d == 0 (at least 1)."""
    for d in range(min(n, max(1, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def peak_rss_mb_self() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def read_spec(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m safesteer.bench.<system> SPEC.json (written by safesteer.bench)")
    return json.loads(Path(args[0]).read_text())


def set_threads(n: int) -> None:
    """One intra-op thread pool of ``n`` threads for the whole process."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(max(1, n))


def measured(per_step: list[dict], warmup: int) -> dict:
    """Totals over the steps after the warm-up: tokens, wall seconds and trained tokens per second."""
    rows = per_step[warmup:]
    tokens = sum(r["tokens"] for r in rows)
    wall = sum(r["step_s"] for r in rows)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0}


def write_result(spec: dict, result: dict) -> None:
    result = {**result, "peak_rss_mb_self": peak_rss_mb_self(), "pid": os.getpid()}
    atomic_write_json(Path(spec["result"]), result)
