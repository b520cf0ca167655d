"""Per-step metrics: stage timers, the row written for every step, and where rows go.

Rows always go to ``metrics.jsonl`` in the run directory; ``logger.backends`` adds TensorBoard,
Weights & Biases (offline) and MLflow (a local file store), see :mod:`safesteer.loggers`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from safesteer.loggers import BACKENDS, open_backends
from safesteer.paths import atomic_write_text
from safesteer.schema import option, require

if TYPE_CHECKING:  # annotations only
    from safesteer.workers import Rollout, StepResult, Sync, TeacherScores


@dataclass
class LoggerConfig:
    """``logger``: where per-step metrics go besides metrics.jsonl (conf/logger)."""

    backends: list[str] = option(default=[])
    project: str = option()

    @staticmethod
    def rules(cfg) -> None:
        for name in cfg.logger.backends:
            require(
                name in BACKENDS,
                "logger.backends",
                list(cfg.logger.backends),
                f"choose from {', '.join(BACKENDS)}",
            )


class Stopwatch(dict):
    """Wall seconds of named blocks: ``with watch("rollout"): ...`` then ``watch["rollout"]``."""

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self[name] = time.perf_counter() - t


def gate_rates(gate: list[bool] | None, steered: list[bool]) -> dict:
    """With a harm-gated teacher: the fraction of training and of anchor sequences it steered."""
    if gate is None:
        return {}
    out = {}
    for key, want in (("gate_steered_train", True), ("gate_steered_anchor", False)):
        xs = [g for g, h in zip(gate, steered) if h == want]
        out[key] = sum(xs) / len(xs) if xs else None
    return out


def step_row(
    step: int, rollout: Rollout, scores: TeacherScores, result: StepResult, sync: Sync, waits: Stopwatch, *,
    steered: list[bool], recovered: int, restarts: int, overlapped: bool,
) -> dict:  # fmt: skip
    """One step's metrics from the stages' results and the driver's waits.

    ``idle_s`` is the step's wall time not spent in any stage; with ``overlapped`` rollout (the next
    batch generated while this one trains) the rollout does not count as busy time of this step.
    """
    wall = waits["step"]
    busy = scores.seconds + result.seconds + sync.seconds + (0.0 if overlapped else rollout.seconds)
    return {
        "step": step,
        "loss": result.loss,
        "anchor_loss": result.anchor_loss,
        "safety_mass": result.safety_mass,
        "grad_norm": result.grad_norm,
        "lr": result.lr,
        "skipped": result.skipped,
        "recovered": recovered,
        "restarts": restarts,
        "policy_lag": step - 1 - rollout.version,
        **gate_rates(scores.gate, steered),
        "completion_tokens": rollout.tokens,
        "mean_completion_len": rollout.tokens / max(len(steered), 1),
        "rollout_s": rollout.seconds,
        "teacher_s": scores.seconds,
        "learner_s": result.seconds,
        "sync_s": sync.seconds,
        "sync_bytes": sync.bytes,
        "rollout_wait_s": waits["rollout"],
        "teacher_wait_s": waits["teacher"],
        "learner_wait_s": waits["learner"],
        "step_s": wall,
        "idle_s": max(0.0, wall - busy),
        "rollout_tokens_per_s": rollout.tokens / max(rollout.seconds, 1e-9),
        "teacher_tokens_per_s": scores.tokens / max(scores.seconds, 1e-9),
        "learner_tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        "weights_sha256": sync.sha256[0],
    }


class MetricsLog:
    """metrics.jsonl (always) and the ``logger.backends``."""

    def __init__(self, run_dir: Path, cfg):
        self.path = run_dir / "metrics.jsonl"
        config = OmegaConf.to_container(cfg, resolve=True)
        name = cfg.tag or run_dir.name
        self.backends = open_backends(
            list(cfg.logger.backends), run_dir, name, {**config, "project": cfg.logger.project}
        )

    def rewrite(self, rows: list[dict]) -> None:
        """Start over from ``rows`` (a resumed or restored run): no duplicate or missing steps."""
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for b in self.backends:
            b.log(row, row["step"])

    def close(self) -> None:
        for b in self.backends:
            b.close()
