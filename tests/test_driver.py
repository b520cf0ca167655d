"""The driver's loop logic in seconds: a fake worker group (no Ray, no engines, no DeepSpeed) drives
:func:`safesteer.driver.distill` through a learner death and restart, the restart limit, non-finite
steps, the checkpoint cadence and one-step staleness. The real groups run these paths in
tests/test_reliability.py (slow); here every branch is reached on purpose and its effect checked.

The fake stands in for Ray actors only; the checkpoints, the metrics log and the batch assembly are
the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safesteer.config import compose
from safesteer.data.training import TrainingData, schedule
from safesteer.driver import Checkpoints, distill
from safesteer.errors import SafeSteerError
from safesteer.prepare import Prepared
from safesteer.workers import LearnerFailure, Rollout, StepResult, Sync, TeacherScores

K = 3  # safety tokens


class FakeWorkers:
    """The worker-group interface the driver uses, in-process. ``die_at`` (step -> times) makes the
    learner group fail at that step; ``skip`` lists steps whose update is non-finite."""

    dtype = "float32"

    def __init__(self, die_at: dict[int, int] | None = None, skip: set[int] = frozenset()):
        self.die_at, self.skip = dict(die_at or {}), set(skip)
        self.events: list[tuple[str, int]] = []  # (stage, step) in call order
        self.learner_step = 0  # optimizer steps the (fake) learners have taken
        self.restarts = self.recovered = 0
        self.loaded: list[int] = []  # the steps of the checkpoints restored

    def generate(self, step: int, prompt_ids, seeds):
        self.events.append(("generate", step))
        return (self.learner_step, prompt_ids, seeds), len(prompt_ids)  # the weights it samples with

    def collect(self, pending, n_prompts: int) -> Rollout:
        version, prompt_ids, seeds = pending
        samples = [[{"completion_ids": [5, 6, 2], "prompt_index": i} for _ in s] for i, s in enumerate(seeds)]
        return Rollout(samples, seconds=0.01, tokens=3 * sum(map(len, seeds)), version=version)

    def score(self, step: int, instructions, completions, steer) -> TeacherScores:
        self.events.append(("score", step))
        lp = torch.log_softmax(torch.randn(len(completions), 3, K), -1)
        return TeacherScores({"logprobs": lp}, None, seconds=0.01, tokens=3 * len(completions))

    def train_step(self, step: int, batch: dict) -> StepResult:
        self.events.append(("train", step))
        if self.die_at.get(step, 0) > 0:
            self.die_at[step] -= 1
            raise LearnerFailure(f"rank 0 died at step {step}")
        assert batch["input_ids"].shape[0] == len(batch["weight"])  # a real assembled batch
        skipped = step in self.skip
        self.learner_step += 0 if skipped else 1
        loss = float("nan") if skipped else 1.0 / step
        return StepResult(loss, None, 0.2, 1.0, 1e-4, tokens=10, seconds=0.01, skipped=skipped)

    def sync(self, version: int) -> Sync:
        self.events.append(("sync", version))
        return Sync(0.0, 0, [f"sha-{version}"])

    def save_checkpoint(self, directory: Path) -> None:
        save_file({"step": torch.tensor([self.learner_step])}, str(directory / "learner-rank0.safetensors"))

    def load_checkpoint(self, directory: Path) -> None:
        self.learner_step = int(load_file(str(directory / "learner-rank0.safetensors"))["step"][0])
        self.loaded.append(self.learner_step)

    def restart_learners(self) -> None:
        self.restarts += 1
        self.learner_step = -1  # a fresh group knows nothing until a checkpoint is restored

    def greedy(self, prompt_ids, max_new_tokens):
        return [[2] for _ in prompt_ids]

    def export(self, dtype: str = "bfloat16") -> bytes:
        return b"weights"


def config(*overrides: str):
    base = [
        "+experiment=smoke",
        "trainer.anchors_per_step=0",
        "trainer.max_steps=6",
        "trainer.checkpoint_every=2",
    ]
    return compose([*base, *overrides])


def data(cfg, n: int = 64) -> TrainingData:
    ids = [[1, 10 + i, 4] for i in range(n)]
    plan = schedule(n, cfg)
    return TrainingData([f"prompt {i}" for i in range(n)], ids, n, plan, 0, pad_id=0, think=None)


def run(tmp_path: Path, cfg, workers: FakeWorkers) -> list[dict]:
    d = data(cfg)
    ckpts = Checkpoints(tmp_path, cfg, d.plan, Prepared(None, None, {"vector": {}}))
    return distill(cfg, workers, d, ckpts)


def steps_of(tmp_path: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*"))


def test_every_step_runs_once_and_checkpoints_follow_the_cadence(tmp_path) -> None:
    cfg = config("trainer.max_steps=5", "trainer.keep_checkpoints=2")
    history = run(tmp_path, cfg, w := FakeWorkers())
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert steps_of(tmp_path) == [4, 5]  # every 2 steps and the last; only the newest 2 kept
    assert w.learner_step == 5 and [e for e in w.events if e[0] == "sync"][-1] == ("sync", 5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5


def test_a_learner_death_restarts_the_group_from_the_newest_checkpoint(tmp_path) -> None:
    cfg = config("trainer.max_restarts=2")
    w = FakeWorkers(die_at={5: 1})
    history = run(tmp_path, cfg, w)
    assert w.restarts == 1 and w.loaded == [4]  # the step-4 checkpoint was restored
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]  # step 5 redone, nothing twice
    assert [r["restarts"] for r in history] == [0, 0, 0, 0, 1, 1]
    assert w.learner_step == 6
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_a_death_before_any_checkpoint_restarts_from_the_initial_weights(tmp_path) -> None:
    cfg = config("trainer.checkpoint_every=0", "trainer.max_steps=3")
    w = FakeWorkers(die_at={2: 1})
    history = run(tmp_path, cfg, w)
    assert w.restarts == 1 and w.loaded == []
    assert [r["step"] for r in history] == [1, 2, 3]
    assert ("sync", 0) in w.events  # the fresh group's weights were pushed to the engines first


def test_the_restart_limit_stops_the_run_naming_the_checkpoint(tmp_path) -> None:
    cfg = config("trainer.max_restarts=1")
    w = FakeWorkers(die_at={3: 5})
    with pytest.raises(SafeSteerError, match=r"died 2 times .* trainer.max_restarts=1.*step-000002"):
        run(tmp_path, cfg, w)
    assert w.restarts == 1


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop(tmp_path) -> None:
    cfg = config("trainer.max_bad_steps=2")
    w = FakeWorkers(skip={3})
    history = run(tmp_path, cfg, w)  # one bad step: skipped, the run goes on
    assert [r["skipped"] for r in history] == [False, False, True, False, False, False]
    assert w.learner_step == 5

    other = tmp_path / "two"
    other.mkdir()
    with pytest.raises(SafeSteerError, match=r"2 consecutive steps .* \(steps 3-4\).*step-000002"):
        run(other, cfg, FakeWorkers(skip={3, 4}))
    assert steps_of(other) == [2]  # no checkpoint of a bad step


@pytest.mark.parametrize("staleness", [0, 1])
def test_one_step_staleness_generates_the_next_batch_while_this_one_trains(tmp_path, staleness: int) -> None:
    cfg = config(f"trainer.max_staleness={staleness}", "trainer.max_steps=3", "trainer.checkpoint_every=0")
    w = FakeWorkers()
    history = run(tmp_path, cfg, w)
    order = w.events
    for n in (1, 2):  # the rollout of step n + 1 starts before (1) or after (0) step n trains
        early = order.index(("generate", n + 1)) < order.index(("train", n))
        assert early == bool(staleness), order
    assert [r["policy_lag"] for r in history] == ([0, 1, 1] if staleness else [0, 0, 0])
