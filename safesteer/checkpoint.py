"""Checkpoints of a distillation run: ``<run dir>/checkpoints/step-NNNNNN/``.

A checkpoint holds each learner rank's state (``learner-rank<r>.safetensors``: fp32 master partition,
Adam state, RNG, counters; see :meth:`safesteer.learner.LearnerWorker.save_state`), the driver's
state (``driver.json``: step, the data order, the metrics so far), copies of the steering vector and
safety tokens the run trains with, and a ``COMPLETE`` marker. It is written in a temporary sibling
directory, fsynced and renamed, so a directory named ``step-*`` with a marker is always whole; a
crash mid-write leaves only a hidden temporary directory, removed on the next start. Nothing in it is
a pickle. The run directory must be on storage every learner node sees (as on any cluster deploy).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from safesteer.errors import SafeSteerError
from safesteer.paths import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
DRIVER = "driver.json"
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class Checkpoint:
    path: Path
    state: dict  # driver.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def file(self, name: str | None) -> Path | None:
        return self.path / name if name else None


def load(path: Path) -> Checkpoint:
    """A complete checkpoint directory, or one clear error naming what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        raise SafeSteerError(f"{path}: not a checkpoint directory (expected checkpoints/step-NNNNNN/)")
    if not (path / COMPLETE).is_file():
        raise SafeSteerError(f"{path}: incomplete checkpoint (no {COMPLETE} marker); use an earlier one")
    try:
        state = json.loads((path / DRIVER).read_text(encoding="utf-8"))
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SafeSteerError(f"{path / DRIVER}: unreadable driver state ({e})") from None
    learners = sorted(path.glob("learner-rank*.safetensors"))
    if not learners:
        raise SafeSteerError(f"{path}: no learner-rank*.safetensors in the checkpoint")
    for f in learners:  # headers only: a file that is not safetensors (a pickle, say) is refused unread
        _check_safetensors(f)
    return Checkpoint(path, state)


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise SafeSteerError(f"{path}: not a safetensors file ({' '.join(str(e).split())[:200]})") from None


def complete(root: Path) -> list[Checkpoint]:
    """Every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            try:
                found.append(load(d))
            except SafeSteerError as e:
                log.warning("ignoring checkpoint: %s", e)
    return sorted(found, key=lambda c: c.step)


def latest(root: Path) -> Checkpoint | None:
    found = complete(root)
    return found[-1] if found else None


def resolve(spec: str | None, run_dir: Path) -> Checkpoint | None:
    """``trainer.resume``: null (start fresh), ``auto`` (the newest complete checkpoint of this run
    directory, if any) or a path (a ``step-*`` directory, or a ``checkpoints`` directory holding some)."""
    if spec in (None, ""):
        return None
    if str(spec) == "auto":
        found = latest(run_dir / "checkpoints")
        if found is None:
            log.info(
                "trainer.resume=auto: no complete checkpoint in %s, starting fresh", run_dir / "checkpoints"
            )
        return found
    path = Path(str(spec))
    if path.is_dir() and not (path / DRIVER).exists() and not (path / COMPLETE).exists():
        found = latest(path)
        if found is None:
            raise SafeSteerError(f"trainer.resume={spec}: no complete checkpoint in that directory")
        return found
    return load(path)


def clean_partial(root: Path) -> None:
    """Remove temporary directories left by a crash in the middle of writing a checkpoint."""
    root = Path(root)
    if root.is_dir():
        for d in root.glob(".step-*.tmp-*"):
            shutil.rmtree(d, ignore_errors=True)


def save(
    root: Path,
    step: int,
    write_learners: Callable[[Path], None],
    driver_state: dict,
    files: list[Path | None],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep`` complete ones."""
    final = Path(root) / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        write_learners(tmp)
        for f in files:
            if f is not None:
                shutil.copy2(f, tmp / Path(f).name)
        atomic_write_json(tmp / DRIVER, {**driver_state, "step": step})
        (tmp / COMPLETE).write_text(f"step {step}\n", encoding="utf-8")
    for old in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)
    return final
