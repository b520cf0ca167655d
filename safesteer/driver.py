"""The driver: the SafeSteer training loop over the worker groups, as in section 3 of the method.

    for each step:
        samples = rollout.generate(prompts)          # the student, on-policy (vLLM)
        teacher = teacher.score(samples)             # the steered teacher, at the safety ids only
        stats   = learners.train_step(batch)         # localized reverse KL, DeepSpeed ZeRO
        rollout.load_weights(learners.export())      # the next rollout sees the new policy
        log; every N steps: checkpoint

With ``trainer.max_staleness=1`` the next batch is generated while the current one trains (the
worker's weights then lag by at most one step). The actor groups, and the replacement of rollout
workers and teachers that die, live in :mod:`safesteer.workers`; fault injection for tests in
:mod:`safesteer.faults`; the metrics row and timers in :mod:`safesteer.metrics`.

A learner rank that dies takes the group down: :func:`distill` recreates it and resumes from the
newest checkpoint, at most ``trainer.max_restarts`` times. A step whose loss or gradient is not
finite is skipped; ``trainer.max_bad_steps`` of them in a row stop the run.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from safesteer import checkpoint
from safesteer.core.batch import assemble
from safesteer.data.training import TrainingData
from safesteer.errors import SafeSteerError
from safesteer.interrupts import STOP
from safesteer.metrics import MetricsLog, Stopwatch, step_row
from safesteer.prepare import Prepared
from safesteer.schema import group, option, require
from safesteer.selection import SelectConfig, Selector
from safesteer.workers import LearnerFailure, Workers


@dataclass
class TrainerConfig:
    """``trainer``: the schedule, checkpoints and failure limits of the loop (conf/trainer)."""

    epochs: int = option(ge=1)
    prompts_per_step: int = option(ge=1)
    anchors_per_step: int = option(ge=0)
    anchor_weight: float = option(ge=0)
    pair_anchors: bool = option()
    max_staleness: int = option(choices=(0, 1))
    max_steps: int | None = option(ge=1)
    checkpoint_every: int = option(ge=0, why="must be >= 0 (0 = never)")
    keep_checkpoints: int = option(ge=1)
    resume: str | None = option()
    max_restarts: int = option(ge=0)
    max_bad_steps: int = option(ge=1)
    select: SelectConfig = group(SelectConfig)

    @staticmethod
    def rules(cfg) -> None:
        r = cfg.trainer.resume
        ok = r is None or r.strip() != ""
        require(ok, "trainer.resume", r, "must be null, auto or a checkpoint path")


log = logging.getLogger(__name__)


def sample_seeds(seed: int, step: int, prompts: list[int], k: int) -> list[list[int]]:
    """One sampling seed per (step, training prompt, sample): what a sample is never depends on which
    worker drew it, in which batch, or whether the run was interrupted."""
    return [[random.Random(f"{seed}:{step}:{p}:{j}").getrandbits(31) for j in range(k)] for p in prompts]


class Checkpoints:
    """The run's checkpoints: the learners' state plus what a resumed run needs to continue."""

    def __init__(self, run_dir: Path, cfg, plan: list[list[int]], prepared: Prepared):
        """Every checkpoint carries the teacher's files (steering vector, safety tokens) and the prepare
        report, so that a resumed run needs nothing else."""
        self.root, self.cfg, self.plan = run_dir / "checkpoints", cfg, plan
        self.keep_files = [prepared.vector_path, prepared.tokens_path]
        self.extra_state = {"prepare": prepared.report}
        checkpoint.clean_partial(self.root)

    def latest(self) -> checkpoint.Checkpoint | None:
        return checkpoint.latest(self.root)

    def save(self, workers: Workers, n: int, history: list[dict]) -> Path:
        names = [Path(f).name if f is not None else None for f in self.keep_files]
        state = {
            **self.extra_state,
            "schedule": self.plan,
            "history": history,
            "seed": self.cfg.seed,
            "files": dict(zip(("vector", "tokens"), names + [None] * (2 - len(names)))),
        }
        keep = self.cfg.trainer.keep_checkpoints
        path = checkpoint.save(self.root, n, workers.save_checkpoint, state, self.keep_files, keep)
        log.info("checkpoint: %s", path)
        return path

    def at(self, workers: Workers, n: int, history: list[dict]) -> Path:
        """A checkpoint of step ``n``: the newest one when it is that step, else a new one."""
        newest = self.latest()
        return newest.path if newest is not None and newest.step == n else self.save(workers, n, history)

    def restore(self, workers: Workers, ck: checkpoint.Checkpoint | None) -> tuple[int, list[dict]]:
        """Learners (and then rollout workers) at checkpoint ``ck``'s state, or at the start."""
        if ck is not None:
            if ck.state.get("schedule") != self.plan:
                raise SafeSteerError(
                    f"{ck.path}: written for a different data order (training data, seed, prompts_per_step, "
                    "epochs or max_steps changed); resume with the run's own settings"
                )
            workers.load_checkpoint(ck.path)
        n = ck.step if ck is not None else 0
        workers.sync(version=n)
        return n, list(ck.state["history"]) if ck is not None else []


@dataclass
class Loop:
    """What every step uses: the config, the worker groups, the data, and where results go."""

    cfg: Any
    workers: Workers
    data: TrainingData
    ckpts: Checkpoints
    logger: MetricsLog
    selector: Selector | None


def distill(
    cfg, workers: Workers, data: TrainingData, ckpts: Checkpoints, selector: Selector | None = None,
    resume: checkpoint.Checkpoint | None = None,
) -> list[dict]:  # fmt: skip
    """The SafeSteer training loop over ``data.plan``. Returns the per-step metrics (also written to
    metrics.jsonl). Anchors (the prompts from ``data.n_train`` on) are scored by the original model
    (conditional steering: the teacher steers the training prompts only). ``resume`` continues from a
    checkpoint; ``selector`` validates every few steps and keeps the best weights."""
    loop = Loop(cfg, workers, data, ckpts, MetricsLog(ckpts.root.parent, cfg), selector)
    if resume is not None and selector is not None:
        selector.restore()
    start, restarts = resume, 0
    try:
        while True:  # a learner rank that dies: a new group, from the newest checkpoint
            try:
                return train(loop, start, restarts)
            except LearnerFailure as e:
                if STOP.settle():  # the ranks died of the signal that stops the run
                    raise STOP.interrupted() from None
                restarts += 1
                start = ckpts.latest()
                check_restarts(restarts, cfg.trainer.max_restarts, e, start)
                workers.restart_learners()
    finally:
        loop.logger.close()


def check_restarts(restarts: int, limit: int, e: LearnerFailure, start: checkpoint.Checkpoint | None) -> None:
    where = start.path if start else None
    if restarts > limit:
        raise SafeSteerError(
            f"a learner rank died {restarts} times (last: {e}); stopping after trainer.max_restarts={limit}. "
            f"Newest checkpoint: {where or 'none'} (resume with trainer.resume=auto)"
        ) from None
    log.warning(
        "a learner rank died (%s); restarting the learner group from %s (%d/%d)",
        e, where or "the initial weights", restarts, limit,
    )  # fmt: skip


def train(loop: Loop, start: checkpoint.Checkpoint | None, restarts: int) -> list[dict]:
    """Steps from ``start`` (a checkpoint; None: the beginning) to the end of the plan."""
    workers, t, total = loop.workers, loop.cfg.trainer, len(loop.data.plan)
    fresh = start is None and not restarts  # the engines already hold the initial weights
    n, history = (0, []) if fresh else loop.ckpts.restore(workers, start)
    if start is not None:
        log.info("resumed from %s: step %d of %d", start.path, n, total)
    loop.logger.rewrite(history)
    pending, bad = None, 0
    with tqdm(total=total, initial=n, desc="distill", unit="step") as bar, STOP.deferred():
        while n < total:
            row, pending = step(loop, n, pending, restarts)
            loop.logger.write(row)
            history.append(row)
            n += 1
            bar.set_postfix(loss=f"{row['loss']:.4f}", mass=f"{row['safety_mass']:.3f}")
            bar.update(1)
            bad = bad + 1 if row["skipped"] else 0
            if bad:
                check_bad_steps(n, bad, t.max_bad_steps, loop.ckpts)
            elif t.checkpoint_every and (n % t.checkpoint_every == 0 or n == total):
                loop.ckpts.save(workers, n, history)
            if STOP.requested():  # Ctrl-C or SIGTERM during this step: it ends with a checkpoint
                raise STOP.interrupted(saved=str(loop.ckpts.at(workers, n, history)))
    return history


def launch(loop: Loop, i: int):
    """Start the rollout of step ``i + 1``: the student samples its prompts (on-policy)."""
    k, prompts = loop.cfg.rollout.samples_per_prompt, loop.data.plan[i]
    seeds = sample_seeds(loop.cfg.seed, i, prompts, k)
    return loop.workers.generate(i + 1, [loop.data.ids[j] for j in prompts], seeds)


def step(loop: Loop, n: int, pending, restarts: int) -> tuple[dict, object]:
    """Optimizer step ``n + 1``: rollout, teacher, learner, weight sync. Returns its metrics row and
    the next step's rollout when it was started early (``trainer.max_staleness=1``)."""
    cfg, workers, data, t = loop.cfg, loop.workers, loop.data, loop.cfg.trainer
    watch, workers.recovered = Stopwatch(), 0
    seqs = [j for j in data.plan[n] for _ in range(cfg.rollout.samples_per_prompt)]
    steered = [j < data.n_train for j in seqs]  # the training prompts; anchors are not
    with watch("step"):
        with watch("rollout"):
            rollout = workers.collect(*(pending or launch(loop, n)))  # samples from the student
        overlap = t.max_staleness == 1 and n + 1 < len(data.plan)
        pending = launch(loop, n + 1) if overlap else None
        comps = rollout.completions
        with watch("teacher"):  # the steered teacher (the original model on anchor prompts)
            scores = workers.score(n + 1, [data.instructions[j] for j in seqs], comps, steered)
        batch = assemble(
            [data.ids[j] for j in seqs],
            comps,
            steered,
            scores.teacher,
            data.pad_id,
            t.anchor_weight,
            data.think,
        )
        with watch("learner"):
            result = workers.train_step(n + 1, batch)  # localized reverse KL
        sync = workers.sync(version=n + 1)  # the next rollout sees the new policy
    row = step_row(n + 1, rollout, scores, result, sync, watch, steered=steered, recovered=workers.recovered,
                   restarts=restarts, overlapped=t.max_staleness == 1)  # fmt: skip
    if loop.selector is not None and not result.skipped and loop.selector.due(n + 1, len(data.plan)):
        row.update(loop.selector.validate(n + 1, workers.greedy, lambda: workers.export("float32")))
    return row, pending


def check_bad_steps(n: int, bad: int, max_bad: int, ckpts: Checkpoints) -> None:
    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", n, bad)
    if bad >= max_bad:
        last = ckpts.latest()
        raise SafeSteerError(
            f"{bad} consecutive steps with a non-finite loss or gradient (steps {n - bad + 1}-{n}); "
            f"stopping (trainer.max_bad_steps={max_bad}). Last good checkpoint: "
            f"{last.path if last else 'none written yet'}"
        )
