"""Checkpoint directories: atomic, marked complete, pruned, found again (no Ray: the learner part is a
plain safetensors file here; test_reliability.py writes real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safesteer import checkpoint
from safesteer.errors import SafeSteerError


def learners(tmp: Path) -> None:
    for rank in (0, 1):
        save_file({"fp32.0": torch.ones(3) * rank}, str(tmp / f"learner-rank{rank}.safetensors"))


def save(root: Path, step: int, keep: int = 2, extra: Path | None = None) -> Path:
    return checkpoint.save(
        root, step, learners, {"history": [{"step": step}], "schedule": [[0]]}, [extra], keep
    )


def test_save_writes_a_complete_directory_and_keeps_the_newest(tmp_path):
    vec = tmp_path / "vector.safetensors"
    vec.write_bytes(b"v")
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save(root, step, keep=2, extra=vec)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000006"]
    ck = checkpoint.latest(root)
    assert ck.step == 6 and ck.state["history"] == [{"step": 6}]
    assert (ck.path / "COMPLETE").is_file() and ck.file("vector.safetensors").read_bytes() == b"v"


def test_a_crash_while_writing_leaves_no_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 2)

    def dies(tmp: Path) -> None:
        (tmp / "learner-rank0.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(root, 4, dies, {"history": []}, [], 2)
    assert [p.name for p in root.iterdir()] == ["step-000002"]
    assert checkpoint.latest(root).step == 2


def test_partial_and_unmarked_directories_are_ignored_and_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 2)
    (root / ".step-000004.tmp-abc").mkdir()  # left by a SIGKILL mid-write
    unmarked = root / "step-000006"
    unmarked.mkdir()
    (unmarked / "driver.json").write_text(json.dumps({"step": 6}))
    assert checkpoint.latest(root).step == 2
    checkpoint.clean_partial(root)
    assert not (root / ".step-000004.tmp-abc").exists()


def test_resolve(tmp_path):
    run_dir = tmp_path / "run"
    assert checkpoint.resolve(None, run_dir) is None
    assert checkpoint.resolve("auto", run_dir) is None  # nothing yet: start fresh
    save(run_dir / "checkpoints", 2)
    save(run_dir / "checkpoints", 4)
    assert checkpoint.resolve("auto", run_dir).step == 4
    assert checkpoint.resolve(str(run_dir / "checkpoints"), tmp_path).step == 4
    assert checkpoint.resolve(str(run_dir / "checkpoints" / "step-000002"), tmp_path).step == 2
    with pytest.raises(SafeSteerError, match="not a checkpoint directory"):
        checkpoint.resolve(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(SafeSteerError, match="no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "run"), tmp_path)


def test_a_learner_file_that_is_not_safetensors_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    path = save(root, 2)
    (path / "learner-rank1.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(SafeSteerError, match=r"learner-rank1.safetensors: not a safetensors file"):
        checkpoint.load(path)
