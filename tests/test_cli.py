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
        ("learner.micro_batch_size=5", "learner.micro_batch_size=5"),  # 24 sequences, 2 ranks
        ("stages=[distill,prepare]", "stages="),
        ("learner.renormalize=true", "learner.renormalize=True"),
        ("rollout.weight_sync=nccl", "rollout.weight_sync=nccl"),  # this machine has no GPU
        ("model.dtype=fp8", "model.dtype=fp8"),
        ("learner.bf16=maybe", "learner.bf16=maybe"),
        # a non-number for a numeric option is named too, not met as a TypeError
        ("learner.lr=abc", "learner.lr=abc: must be a number"),
        ("trainer.anchors_per_step=abc", "trainer.anchors_per_step=abc: must be an integer"),
        ("trainer.anchor_weight=abc", "trainer.anchor_weight=abc: must be a number"),
    ],
)
def test_invalid_values_fail_with_one_line(tmp_path, override, culprit):
    p = run(override, tmp=tmp_path / "run")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # a refused run leaves no empty run directory behind


def test_a_refused_run_keeps_a_directory_that_holds_anything_else(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    p = run("learner.lr=abc", tmp=run_dir)
    assert p.returncode == 2, p.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=1.5", "trainer.epochs=1.5: must be an integer"),
        ("trainer.max_steps=x", "trainer.max_steps=x: must be an integer or null"),
        ("seed=true", "seed=True: must be an integer"),
        ("rollout.top_p=high", "rollout.top_p=high: must be a number"),
        ("steering.coeffs=[a,0.5]", "steering.coeffs=['a', 0.5]: must be a list of numbers"),
        ("steering.layers=[1.5]", "steering.layers=[1.5]: must be a list of integers or null"),
        ("steering.max_benign_refusal=1.5", "steering.max_benign_refusal=1.5: must be in [0, 1]"),
        ("tokens.min_steered_prob=-1", "tokens.min_steered_prob=-1: must be >= 0"),
        ("learner.betas=[0.9]", "learner.betas=[0.9]: must be two numbers in [0, 1)"),
        ("eval.n_mmlu=0", "eval.n_mmlu=0: must be >= 1"),
        ("cluster.placement_timeout_s=soon", "cluster.placement_timeout_s=soon: must be a number"),
    ],
)
def test_every_numeric_option_is_type_checked(override, message):
    from safesteer.config import compose
    from safesteer.errors import SafeSteerError

    with pytest.raises(SafeSteerError) as e:  # a wrong type while composing, a bad value after
        compose([override])
    assert str(e.value) == message


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
