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

from tqdm import tqdm

from safesteer import checkpoint
from safesteer.core.batch import assemble
from safesteer.core.generation import reasoning_ids
from safesteer.errors import SafeSteerError
from safesteer.interrupts import STOP
from safesteer.metrics import MetricsLog, Stopwatch, step_row
from safesteer.schema import group, option, require
from safesteer.selection import SelectConfig
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


@dataclass
class Step:
    prompts: list[int]  # indices into the training set, then (>= n_train) into the anchor set


def schedule(n_prompts: int, cfg, n_anchors: int = 0, pairs: dict[int, int] | None = None) -> list[Step]:
    """Seeded shuffle per epoch; full steps of ``prompts_per_step`` (a remainder is dropped).

    With anchors, each step also takes ``trainer.anchors_per_step`` anchor prompts (indices offset by
    ``n_prompts``), cycling through a seeded order of the anchor set. With ``pairs`` (training index
    -> anchor index), a step's anchors are first the pairs of its training prompts (the benign
    question of the same form beside each harmful one), then the cycle.
    """
    steps = []
    per = cfg.trainer.prompts_per_step
    for epoch in range(cfg.trainer.epochs):
        order = list(range(n_prompts))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        steps += [Step(order[i : i + per]) for i in range(0, n_prompts - per + 1, per)]
    if cfg.trainer.max_steps is not None:
        steps = steps[: cfg.trainer.max_steps]
    if not steps:
        raise SafeSteerError(
            f"trainer.prompts_per_step={per}: larger than the {n_prompts} usable training prompts, no step to run"
        )
    a = cfg.trainer.anchors_per_step if n_anchors else 0
    if a:
        order = list(range(n_anchors))
        random.Random(f"anchors:{cfg.seed}").shuffle(order)
        cursor = 0
        for st in steps:
            chosen = [pairs[p] for p in st.prompts if pairs and p in pairs][:a]
            while len(chosen) < a:
                j = order[cursor % n_anchors]
                cursor += 1
                if j not in chosen or n_anchors < a:
                    chosen.append(j)
            st.prompts = st.prompts + [n_prompts + j for j in chosen]
    return steps


def sample_seeds(seed: int, step: int, prompts: list[int], k: int) -> list[list[int]]:
    """One sampling seed per (step, training prompt, sample): what a sample is never depends on which
    worker drew it, in which batch, or whether the run was interrupted."""
    return [[random.Random(f"{seed}:{step}:{p}:{j}").getrandbits(31) for j in range(k)] for p in prompts]


@dataclass
class Prompts:
    """The prompts a schedule indexes: the training prompts, then the harmless anchors."""

    instructions: list[str]
    ids: list[list[int]]
    n_train: int


class Checkpoints:
    """The run's checkpoints: the learners' state plus what a resumed run needs to continue."""

    def __init__(self, run_dir: Path, cfg, plan: list[list[int]], keep_files, extra_state: dict | None):
        self.root, self.cfg, self.plan = run_dir / "checkpoints", cfg, plan
        self.keep_files, self.extra_state = list(keep_files), extra_state or {}
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


def distill(
    cfg,
    workers: Workers,
    tok,
    instructions: list[str],
    prompt_ids: list[list[int]],
    run_dir: Path,
    keep_files: list[Path | None] = (),
    resume: checkpoint.Checkpoint | None = None,
    extra_state: dict | None = None,
    anchors: tuple[list[str], list[list[int]]] = ([], []),
    pairs: dict[int, int] | None = None,
    selector=None,
) -> list[dict]:
    """The SafeSteer training loop. Returns the per-step metrics (also written to metrics.jsonl).

    ``anchors`` (instructions, ids) are harmless prompts mixed into every step and scored by the
    original model (conditional steering: the teacher steers the training prompts only).
    ``resume`` continues from a checkpoint; ``keep_files`` (steering vector, safety tokens) and
    ``extra_state`` are stored in every checkpoint so that a resumed run needs nothing else.
    ``selector`` (:class:`safesteer.selection.Selector`) validates every few steps and keeps the best weights.
    """
    plan = [s.prompts for s in schedule(len(instructions), cfg, len(anchors[0]), pairs)]
    prompts = Prompts(instructions + list(anchors[0]), prompt_ids + list(anchors[1]), len(instructions))
    ckpts = Checkpoints(run_dir, cfg, plan, keep_files, extra_state)
    logger = MetricsLog(run_dir, cfg)
    if resume is not None and selector is not None:
        selector.restore()
    start, restarts = resume, 0
    try:
        while True:  # a learner rank that dies: a new group, from the newest checkpoint
            try:
                return train(cfg, workers, tok, prompts, plan, ckpts, logger, selector, start, restarts)
            except LearnerFailure as e:
                if STOP.settle():  # the ranks died of the signal that stops the run
                    raise STOP.interrupted() from None
                restarts += 1
                start = ckpts.latest()
                where = start.path if start else "the initial weights"
                if restarts > cfg.trainer.max_restarts:
                    raise SafeSteerError(
                        f"a learner rank died {restarts} times (last: {e}); stopping after "
                        f"trainer.max_restarts={cfg.trainer.max_restarts}. Newest checkpoint: "
                        f"{start.path if start else 'none'} (resume with trainer.resume=auto)"
                    ) from None
                log.warning(
                    "a learner rank died (%s); restarting the learner group from %s (%d/%d)",
                    e,
                    where,
                    restarts,
                    cfg.trainer.max_restarts,
                )
                workers.restart_learners()
    finally:
        logger.close()


def train(cfg, workers, tok, prompts: Prompts, plan, ckpts, logger, selector, start, restarts) -> list[dict]:
    """Steps from ``start`` (a checkpoint; None: the beginning) to the end of ``plan``."""
    t, k, total = cfg.trainer, cfg.rollout.samples_per_prompt, len(plan)
    fresh = start is None and not restarts  # the engines already hold the initial weights
    n, history = (0, []) if fresh else ckpts.restore(workers, start)
    if start is not None:
        log.info("resumed from %s: step %d of %d", start.path, n, total)
    logger.rewrite(history)

    def launch(i: int):  # the rollout of step i + 1
        ids = [prompts.ids[j] for j in plan[i]]
        return workers.generate(i + 1, ids, sample_seeds(cfg.seed, i, plan[i], k))

    pending, bad = None, 0
    with tqdm(total=total, initial=n, desc="distill", unit="step") as bar, STOP.deferred():
        while n < total:
            watch, workers.recovered = Stopwatch(), 0
            seqs = [j for j in plan[n] for _ in range(k)]
            steered = [j < prompts.n_train for j in seqs]  # the training prompts; anchors are not
            with watch("step"):
                with watch("rollout"):
                    ro = workers.collect(*(pending or launch(n)))  # samples from the student
                pending = launch(n + 1) if t.max_staleness == 1 and n + 1 < total else None
                comps = [s["completion_ids"] for samples in ro["samples"] for s in samples]
                with watch("teacher"):  # the steered teacher (the original model on anchor prompts)
                    sc = workers.score(n + 1, [prompts.instructions[j] for j in seqs], comps, steered)
                batch = assemble(
                    [prompts.ids[j] for j in seqs],
                    comps,
                    steered,
                    sc["teacher"],
                    tok.pad_token_id,
                    t.anchor_weight,
                    reasoning_ids(tok),
                )
                with watch("learner"):
                    stats = workers.train_step(n + 1, batch)  # localized reverse KL
                sync = workers.sync(version=n + 1)  # the next rollout sees the new policy
            row = step_row(
                n + 1,
                ro,
                sc,
                stats,
                sync,
                watch,
                steered=steered,
                sequences=len(comps),
                recovered=workers.recovered,
                restarts=restarts,
                overlapped=t.max_staleness == 1,
            )
            if selector is not None and not stats["skipped"] and selector.due(n + 1, total):
                decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
                row.update(
                    selector.validate(n + 1, workers.greedy, decode, lambda: workers.export("float32"))
                )
            logger.write(row)
            history.append(row)
            n += 1
            bar.set_postfix(loss=f"{row['loss']:.4f}", mass=f"{row['safety_mass']:.3f}")
            bar.update(1)
            bad = bad + 1 if stats["skipped"] else 0
            if bad:
                check_bad_steps(n, bad, t.max_bad_steps, ckpts)
            elif t.checkpoint_every and (n % t.checkpoint_every == 0 or n == total):
                ckpts.save(workers, n, history)
            if STOP.requested():  # Ctrl-C or SIGTERM during this step: it ends with a checkpoint
                raise STOP.interrupted(saved=str(ckpts.at(workers, n, history)))
    return history


def check_bad_steps(n: int, bad: int, max_bad: int, ckpts: Checkpoints) -> None:
    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", n, bad)
    if bad >= max_bad:
        last = ckpts.latest()
        raise SafeSteerError(
            f"{bad} consecutive steps with a non-finite loss or gradient (steps {n - bad + 1}-{n}); "
            f"stopping (trainer.max_bad_steps={max_bad}). Last good checkpoint: "
            f"{last.path if last else 'none written yet'}"
        )
