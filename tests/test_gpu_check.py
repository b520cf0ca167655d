"""``python -m safesteer.gpu_check``, the GPU check, run here on CPU (gloo) on the tiny model so that it
cannot rot between the sessions that have a GPU. What it prints on a CUDA device is in
docs/performance.md; no GPU exists on this machine, so CUDA and NCCL themselves are not exercised here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "safesteer.gpu_check", "--model", "tiny", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep")
    cmd = [sys.executable, "-m", "safesteer.prepare", "+experiment=smoke", f"hydra.run.dir={out}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_gpu_check_runs_every_stage_and_passes(run_dir, tmp_path):
    profile = tmp_path / "profile.txt"
    p = gpu_check(
        "--run", str(run_dir), "--prompts", "8", "--max-new-tokens", "8", "--micro-batch-size", "2",
        "--profile", str(profile),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    stages = [r["stage"] for r in rows]
    steps, plain, full = ["learner_step"] * 3, ["plain_step"] * 3, ["plain_full_logits_step"] * 3
    assert stages == [
        "setup", "generate", "teacher", "learner_init", *steps, *plain, "learner_vs_plain", *full,
        "chunked_head_vs_full_logits", "export", "verdict",
    ]  # fmt: skip
    by = {r["stage"]: r for r in rows}
    assert by["verdict"]["ok"] and by["verdict"]["failures"] == []
    assert by["learner_init"]["backend"] == "gloo"
    assert [r["step"] for r in rows if r["stage"] == "learner_step"] == [1, 2, 3]
    assert by["teacher"]["finite"] and by["teacher"]["tokens_per_s"] > 0
    assert by["export"]["changed"] > 0 and by["export"]["tensors"] > 0
    # the plain PyTorch comparison computes the same loss on the same batch from the same weights
    first = {r["stage"]: r["loss"] for r in rows if r.get("step") == 1}
    assert first["plain_step"] == pytest.approx(first["learner_step"], rel=1e-3), first
    assert by["learner_vs_plain"]["ratio"] > 0
    # the chunked head and the full logits give the same losses
    full_losses = [r["loss"] for r in rows if r["stage"] == "plain_full_logits_step"]
    plain_losses = [r["loss"] for r in rows if r["stage"] == "plain_step"]
    assert full_losses == pytest.approx(plain_losses, rel=1e-3)
    assert by["chunked_head_vs_full_logits"]["ratio"] > 0
    text = profile.read_text()
    assert "## learner step" in text and "## plain PyTorch step" in text and "aten::" in text


def test_gpu_check_refuses_a_directory_without_a_run(tmp_path):
    p = gpu_check("--run", str(tmp_path))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: --run {tmp_path}: no vector.safetensors")
