"""The Hydra app refuses bad configuration at start: one line naming the option, non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*overrides: str, module: str = "safesteer.run", tmp: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, f"hydra.run.dir={tmp}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("learner.loss=foo", "learner.loss=foo"),
        ("tokens.method=best", "tokens.method=best"),
        ("teacher.kind=oracle", "teacher.kind=oracle"),
        ("rollout.temperature=0", "rollout.temperature=0"),
        ("trainer.max_staleness=3", "trainer.max_staleness=3"),
        ("learner.micro_batch_size=3", "learner.micro_batch_size=3"),
        ("stages=[distill,prepare]", "stages="),
        ("learner.renormalize=true", "learner.renormalize=True"),
        ("rollout.weight_sync=nccl", "rollout.weight_sync=nccl"),  # this machine has no GPU
        ("model.dtype=fp8", "model.dtype=fp8"),
        ("learner.bf16=maybe", "learner.bf16=maybe"),
    ],
)
def test_invalid_values_fail_with_one_line(tmp_path, override, culprit):
    p = run(override, tmp=tmp_path / "run")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_key_is_refused_by_hydra(tmp_path):
    p = run("learner.no_such_option=1", tmp=tmp_path / "run")
    assert p.returncode != 0
    assert "no_such_option" in p.stderr and "Traceback" not in p.stderr


def test_bad_training_file_names_the_file(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"instruction": "ok"}\n{not json}\n')
    p = run(f"data.train={bad}", "model.path=tiny", tmp=tmp_path / "run")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "line 2" in lines[0], p.stderr


def test_debug_true_shows_the_traceback(tmp_path):
    p = run("learner.loss=foo", "debug=true", tmp=tmp_path / "run")
    assert p.returncode != 0 and "Traceback" in p.stderr
