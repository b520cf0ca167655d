"""The benchmark (``python -m safesteer.bench``): its figures, its memory sampling, and one real end-to-end
run of every system on the tiny random model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from safesteer.bench.common import largest_divisor_at_most, measured
from safesteer.bench.procmon import classify, run_monitored
from safesteer.bench.runner import COLORS, LABELS, MODULES, SYSTEMS, TARGETS, override, parse_args, summarize

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ pieces
def test_largest_divisor_at_most():
    assert largest_divisor_at_most(32, 5) == 4
    assert largest_divisor_at_most(64, 8) == 8
    assert largest_divisor_at_most(7, 5) == 1
    assert largest_divisor_at_most(6, 100) == 6


def test_override_quotes_only_what_hydra_cannot_read_plain():
    assert override("model.path", "/root/.cache/m-1.0") == "model.path=/root/.cache/m-1.0"
    assert override("tokens.path", "/tmp/a b/t.json") == "tokens.path='/tmp/a b/t.json'"
    assert override("x", "it's") == "x='it\\'s'"


def test_measured_skips_the_warmup():
    steps = [{"tokens": 10, "step_s": 100.0}, {"tokens": 30, "step_s": 2.0}, {"tokens": 50, "step_s": 3.0}]
    m = measured(steps, warmup=1)
    assert m == {"tokens": 80, "wall_s": 5.0, "tokens_per_s": 16.0}


def test_classify_names_ray_actors_by_process_title():
    assert classify("anything", is_root=True) == "driver"
    assert classify("ray::RolloutWorker.generate", is_root=False) == "rollout"
    assert classify("ray::TeacherWorker", is_root=False) == "teacher"
    assert classify("ray::LearnerWorker.train_step", is_root=False) == "learner"
    assert classify("/venv/lib/ray/core/src/ray/raylet/raylet --x", is_root=False) == "ray_system"
    assert classify("sleep 5", is_root=False) == "other"


def _run(system: str, repeat: int, tps: float, **extra) -> dict:
    mem = {"by_role": {"driver": {"count": 1, "max_peak_rss_mb": 100.0, "sum_peak_rss_mb": 100.0}}}
    return {
        "system": system,
        "repeat": repeat,
        "ok": True,
        "tokens": 100,
        "wall_s": 100 / tps,
        "tokens_per_s": tps,
        "stage_s": {"step_s": 100 / tps},
        "memory": {**mem, "tree_peak_rss_mb": 100.0},
        **extra,
    }


def test_summary_takes_medians_and_ratios_of_medians():
    frac = {"sync": 0.04, "idle": 0.2}
    runs = {
        "pipeline": [_run("pipeline", i, t, stage_fraction=frac) for i, t in enumerate((30.0, 10.0, 20.0))],
        "sequential": [_run("sequential", i, t) for i, t in enumerate((4.0, 5.0, 6.0))],
        "trl": [_run("trl", 0, 18.0), {"system": "trl", "repeat": 1, "ok": False, "error": "boom"}],
    }
    s = summarize(runs, {"measured_steps": 2})
    assert s["systems"]["pipeline"]["tokens_per_s"] == 20.0
    assert s["systems"]["sequential"]["tokens_per_s"] == 5.0
    assert s["systems"]["trl"]["runs_ok"] == 1 and s["systems"]["trl"]["errors"] == ["boom"]
    assert s["ratios"] == {"pipeline/sequential": 4.0, "pipeline/trl": 20.0 / 18.0}
    t = s["targets"]
    assert t["pipeline/sequential"]["met"] is True and t["pipeline/trl"]["met"] is False
    assert t["sync_fraction"]["met"] is True and t["overhead_fraction"]["met"] is False


def test_trl_distill_is_a_system_with_its_ratio_and_bar():
    assert "trl_distill" in SYSTEMS and "trl_distill" in parse_args([]).systems
    assert parse_args(["--systems=trl,trl_distill"]).systems == ["trl", "trl_distill"]
    for name in SYSTEMS:
        assert name in LABELS and name in COLORS
        assert name == "pipeline" or importlib.util.find_spec(MODULES[name]) is not None
    assert TARGETS["pipeline/trl_distill"] == (">=", 1.2)
    runs = {
        "pipeline": [_run("pipeline", 0, 30.0, stage_fraction={"sync": 0.01, "idle": 0.01})],
        "trl": [_run("trl", 0, 10.0)],
        "trl_distill": [_run("trl_distill", i, t) for i, t in enumerate((20.0, 30.0, 24.0))],
    }
    s = summarize(runs, {"measured_steps": 1})
    assert s["systems"]["trl_distill"]["tokens_per_s"] == 24.0
    assert s["ratios"] == {"pipeline/trl": 3.0, "pipeline/trl_distill": 1.25}
    t = s["targets"]["pipeline/trl_distill"]
    assert t == {"bar": ">= 1.2", "value": 1.25, "met": True}
    runs["trl_distill"] = [_run("trl_distill", 0, 26.0)]
    assert summarize(runs, {"measured_steps": 1})["targets"]["pipeline/trl_distill"]["met"] is False
    # no trl_distill run: no ratio, and the bar is unmeasured
    del runs["trl_distill"]
    s = summarize(runs, {"measured_steps": 1})
    assert "pipeline/trl_distill" not in s["ratios"] and s["targets"]["pipeline/trl_distill"]["met"] is None


def test_memory_of_a_process_tree_is_sampled_per_process(tmp_path):
    # a parent holding ~150 MiB starts a child holding ~250 MiB; both peaks must be seen
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        hold = bytearray(150 * 2**20)
        child = "hold = bytearray(250 * 2**20); import time; time.sleep(2.0)"
        subprocess.run([sys.executable, "-c", child], check=True)
        time.sleep(0.5)
        """
    )
    res = run_monitored([sys.executable, "-c", script], tmp_path / "log", None, tmp_path, 60, interval=0.1)
    assert res["returncode"] == 0 and not res["timed_out"]
    procs = res["memory"]["processes"]
    root = [p for p in procs if p["role"] == "driver"]
    others = [p for p in procs if p["role"] == "other"]
    assert len(root) == 1 and 150 <= root[0]["peak_rss_mb"] < 400
    assert len(others) == 1 and others[0]["peak_rss_mb"] >= 250
    assert res["memory"]["tree_peak_rss_mb"] >= 400
    assert res["leftover_processes"] == 0


def test_procmon_counts_shared_pages_once_in_pss(tmp_path):
    """A parent touching 300 MiB forks a child that shares them (copy-on-write): the RSS sum counts
    them twice, the PSS sum once."""
    script = textwrap.dedent(
        """
        import os, time
        hold = bytearray(300 * 2**20)
        if os.fork() == 0:
            time.sleep(2.0)
            os._exit(0)
        time.sleep(2.0)
        os.wait()
        """
    )
    res = run_monitored([sys.executable, "-c", script], tmp_path / "log", None, tmp_path, 60, 0.1, 0.1)
    mem = res["memory"]
    assert res["returncode"] == 0 and mem["tree_peak_rss_mb"] >= 600
    assert 300 <= mem["tree_peak_pss_mb"] < 0.75 * mem["tree_peak_rss_mb"]
    assert abs(sum(mem["pss_peak_by_role_mb"].values()) - mem["tree_peak_pss_mb"]) < 1


def test_procmon_command_writes_the_peak_of_a_command(tmp_path):
    """``python -m safesteer.bench.procmon OUT -- CMD``: the summary of a real child holding ~200 MiB,
    and the child's exit status passed on."""
    out = tmp_path / "mem.json"
    hold = "hold = bytearray(200 * 2**20); import time; time.sleep(1.5)"
    p = subprocess.run([sys.executable, "-m", "safesteer.bench.procmon", str(out), "--pss-interval", "0.2", "--", sys.executable, "-c", hold],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["returncode"] == 0 and res["memory"]["tree_peak_rss_mb"] >= 200
    assert 200 <= res["memory"]["tree_peak_anon_mb"] <= res["memory"]["tree_peak_rss_mb"]
    assert "peak anonymous sum" in p.stderr
    assert 200 <= res["memory"]["tree_peak_pss_mb"] <= res["memory"]["tree_peak_rss_mb"]
    fail = [
        sys.executable,
        "-m",
        "safesteer.bench.procmon",
        str(out),
        "--",
        sys.executable,
        "-c",
        "raise SystemExit(3)",
    ]
    assert subprocess.run(fail, capture_output=True, timeout=120).returncode == 1
    assert json.loads(out.read_text())["returncode"] == 3


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_end_to_end_on_the_tiny_model(tmp_path):
    systems = ["pipeline", "sequential", "trl", "trl_distill"]  # trl is installed by make setup (dev extra)
    prompts, samples, new_tokens, steps = 4, 2, 8, 1
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "safesteer.bench",
        "--model=tiny",
        f"--prompts={prompts}",
        f"--samples={samples}",
        f"--max-new-tokens={new_tokens}",
        f"--steps={steps}",
        "--repeats=1",
        "--threads=1",
        f"--systems={','.join(systems)}",
        f"--out={out}",
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=840)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    doc = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 1000
    assert doc["complete"] is True
    assert not list(out.glob(".bench.*tmp*")), "a temporary file was left behind"
    w = doc["workload"]
    assert (w["prompts_per_step"], w["samples_per_prompt"], w["measured_steps"]) == (prompts, samples, steps)
    most = prompts * samples * new_tokens * steps  # completion tokens can be no more than this
    least = prompts * samples * steps  # and every completion has at least one token
    for name in systems:
        s = doc["systems"][name]
        assert s["runs_ok"] == 1, s.get("errors")
        (run,) = doc["runs"][name]
        assert len(run["steps"]) == w["warmup_steps"] + steps
        assert least <= run["tokens"] <= most, (name, run["tokens"])
        assert run["wall_s"] > 0 and run["tokens_per_s"] == pytest.approx(run["tokens"] / run["wall_s"])
        assert s["tokens_per_s"] == pytest.approx(run["tokens_per_s"])
        assert all(v > 0 for v in s["peak_rss_mb"].values()), s["peak_rss_mb"]
        assert run["leftover_processes"] == 0
    pipe = doc["systems"]["pipeline"]
    # the Ray actors were found and measured, each in its own process
    cfg = w["settings"]
    assert pipe["process_count"]["rollout"] == cfg["rollout"]["num_workers"]
    assert pipe["process_count"]["teacher"] == cfg["teacher"]["num_actors"]
    assert pipe["process_count"]["learner"] == cfg["learner"]["world_size"]
    for role in ("driver", "rollout", "teacher", "learner"):
        assert pipe["peak_rss_mb"][role] > 50, role
    stages = pipe["stage_s_per_step"]
    for key in ("rollout_s", "teacher_s", "learner_s", "sync_s", "step_s"):
        assert stages[key] > 0, key
    assert 0 <= pipe["stage_fraction"]["idle"] < 1
    for other in systems[1:]:
        assert doc["systems"][other]["peak_rss_mb"]["trainer"] > 50
        ratio = doc["ratios"][f"pipeline/{other}"]
        assert ratio == pytest.approx(pipe["tokens_per_s"] / doc["systems"][other]["tokens_per_s"], rel=1e-12)
    assert set(doc["targets"]) == {
        "pipeline/sequential",
        "pipeline/trl",
        "pipeline/trl_distill",
        "sync_fraction",
        "overhead_fraction",
    }
    trainers = {
        "trl": "trl.experimental.gkd.gkd_trainer.GKDTrainer",
        "trl_distill": "trl.trainer.distillation_trainer.DistillationTrainer",
    }
    for name in systems[2:]:  # the TRL baselines ran TRL's own trainer and timed its generation
        (run,) = doc["runs"][name]
        assert run["trainer"] == trainers[name]
        assert run["sequences_per_micro_batch"] == w["single_process_micro_batch"]
        assert run["threads"] == 1  # --threads, kept through TRL's (and its vLLM engine's) set-up
        for step in run["steps"]:
            assert step["tokens"] >= prompts * samples and step["generate_s"] > 0, (name, step)
            assert step["train_s"] > 0, (name, step)


def test_trl_distill_generates_with_hf_where_vllm_repacks_weights():
    from safesteer.bench.trl_distill import vllm_sync_works

    assert vllm_sync_works({"avx2", "avx512f", "fma"})
    assert not vllm_sync_works({"avx2", "avx512f", "avx512_bf16"})
    assert not vllm_sync_works({"avx2", "amx_bf16"})
