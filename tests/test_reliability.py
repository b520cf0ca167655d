"""Faults, for real: the ``smoke`` pipeline (Ray actors, vLLM CPU engines, two DeepSpeed gloo ranks)
with its driver SIGKILLed and resumed, a rollout worker, a teacher or a learner rank SIGKILLed mid-step,
and non-finite losses. Every run that finishes must end with exactly the weights of an uninterrupted run
with the same seed: bitwise, since on CPU every kernel here is deterministic and every sample has its
own seed. Faults are injected with ``SAFESTEER_FAULT`` (see :mod:`safesteer.faults`)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import kill_marked, pids_with_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Four optimizer steps of two prompts, a checkpoint every two steps; prepare, distill, export.
BASE = (
    "+experiment=smoke",
    "trainer.prompts_per_step=2",
    "trainer.max_steps=4",
    "trainer.checkpoint_every=2",
    "stages=[prepare,distill,export]",
)


def marked_env(fault: str | None = None) -> tuple[str, dict]:
    """A marker every process of the run inherits, and the run's environment."""
    mark = f"SAFESTEER_TEST_RUN={secrets.token_hex(6)}"
    env = {**os.environ, mark.split("=")[0]: mark.split("=")[1]}
    env.pop("SAFESTEER_FAULT", None)
    if fault:
        env["SAFESTEER_FAULT"] = fault
    return mark, env


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "safesteer.run", *BASE, f"hydra.run.dir={run_dir}", *overrides]


def run(
    run_dir: Path, *overrides: str, fault: str | None = None, cmd: list[str] | None = None
) -> subprocess.CompletedProcess:
    mark, env = marked_env(fault)
    cmd = cmd or command(run_dir, *overrides)
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:  # a SIGKILLed driver leaves Ray's node agents behind: stop whatever this run started
        kill_marked(mark, grace=5.0)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "export" / "model" / "model.safetensors").read_bytes()).hexdigest()


def ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stderr[-3000:]


def output(p: subprocess.CompletedProcess) -> str:
    return p.stdout + p.stderr


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one error line a failed run prints (no traceback)."""
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run: per-step weight hashes and the final weights."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    ok(run(run_dir))
    hist = rows(run_dir)
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert len({r["weights_sha256"] for r in hist}) == 4  # every step changed the weights
    assert all(r["recovered"] == 0 and r["restarts"] == 0 and not r["skipped"] for r in hist)
    return {"dir": run_dir, "steps": [r["weights_sha256"] for r in hist], "final": weights(run_dir)}


def test_checkpoints_are_complete_safetensors_and_pruned(reference):
    root = reference["dir"] / "checkpoints"
    # steps 2 and 4 were written; trainer.keep_checkpoints=1 kept the newest only
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]
    ck = root / "step-000004"
    assert (ck / "COMPLETE").is_file()
    state = json.loads((ck / "driver.json").read_text())
    assert state["step"] == 4 and [r["step"] for r in state["history"]] == [1, 2, 3, 4]
    assert len(state["schedule"]) == 4 and all(len(s) == 4 for s in state["schedule"])  # 2 + 2 anchors
    names = sorted(p.name for p in ck.iterdir())
    assert names == sorted(
        ["COMPLETE", "driver.json", "learner-rank0.safetensors", "learner-rank1.safetensors"]
        + ["safety_tokens.json", "vector.safetensors"]
    )
    from safetensors import safe_open

    with safe_open(str(ck / "learner-rank0.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["safesteer"])
    assert {"fp32.0", "exp_avg.0", "exp_avg_sq.0", "step.0", "rng.torch"} <= keys
    assert meta["steps"] == 4 and meta["world_size"] == 2 and meta["zero_stage"] == 1


def test_sigkill_mid_training_then_resume_gives_the_same_weights(reference, tmp_path):
    run_dir = tmp_path / "run"
    p = run(run_dir, "trainer.keep_checkpoints=2", fault="driver:0:3")  # SIGKILL while step 3 trains
    assert p.returncode == -9, p.stderr[-3000:]
    assert [r["step"] for r in rows(run_dir)] == [1, 2]
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    assert not (run_dir / "export").exists()
    assert (run_dir / ".safesteer.lock").is_file()  # the killed run's lock file: stale, it must not block

    p = run(run_dir, "trainer.keep_checkpoints=2", "trainer.resume=auto")
    ok(p)
    assert "resumed from" in output(p) and "step-000002" in output(p)
    hist = rows(run_dir)
    assert [r["step"] for r in hist] == [1, 2, 3, 4]  # no duplicate, no gap
    assert [r["weights_sha256"] for r in hist] == reference["steps"]
    assert weights(run_dir) == reference["final"]
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.parametrize("role", ["rollout", "teacher"])
def test_a_killed_worker_is_replaced_and_its_work_redone(reference, tmp_path, role):
    run_dir = tmp_path / "run"
    p = run(run_dir, fault=f"{role}:0:3")
    ok(p)
    assert f"fault injection: {role} 0 at step 3" in output(p)
    assert f"{role} {'worker ' if role == 'rollout' else ''}0 died; starting a new one" in output(p)
    hist = rows(run_dir)
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert sum(r["recovered"] for r in hist) == 1
    assert weights(run_dir) == reference["final"]


def test_a_killed_learner_rank_restarts_the_group_from_the_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    p = run(run_dir, fault="learner:1:3")
    ok(p)
    assert "restarting the learner group from" in output(p) and "step-000002 (1/2)" in output(p)
    hist = rows(run_dir)
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert [r["restarts"] for r in hist] == [0, 0, 1, 1]
    assert weights(run_dir) == reference["final"]


def test_learner_deaths_beyond_max_restarts_stop_the_run(tmp_path):
    run_dir = tmp_path / "run"
    p = run(run_dir, "trainer.max_restarts=0", fault="learner:0:3")
    assert p.returncode == 2, p.stderr[-3000:]
    last = error_line(p)
    assert last.startswith("error: a learner rank died 1 times") and "trainer.max_restarts=0" in last, last
    assert "step-000002" in last
    assert not (run_dir / "export").exists()


def test_a_non_finite_step_is_skipped_and_logged(reference, tmp_path):
    run_dir = tmp_path / "run"
    ok(run(run_dir, fault="nan:0:3"))
    hist = rows(run_dir)
    assert [r["skipped"] for r in hist] == [False, False, True, False]
    # the skipped step left the weights as they were; training went on from there
    assert hist[2]["weights_sha256"] == hist[1]["weights_sha256"] == reference["steps"][1]
    assert hist[3]["weights_sha256"] != hist[2]["weights_sha256"]


def test_consecutive_non_finite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    p = run(run_dir, "trainer.checkpoint_every=1", "trainer.max_bad_steps=2", fault="nan:0:2,nan:1:3")
    assert p.returncode == 2, p.stderr[-3000:]
    last = error_line(p)
    assert "2 consecutive steps with a non-finite loss or gradient (steps 2-3)" in last, last
    assert "step-000001" in last
    assert [d.name for d in (run_dir / "checkpoints").iterdir()] == ["step-000001"]
    assert [r["skipped"] for r in rows(run_dir)] == [False, True, True]
    assert not (run_dir / "export").exists()


# --------------------------------------------------------------------------- stopping when asked
def stopped(run_dir: Path, sig: int, group: bool, again_after: float | None = None) -> tuple[int, str, list]:
    """Start a run in a session of its own, send ``sig`` (to its process group: what Ctrl-C in a
    terminal does, actors included; else to the driver alone) once checkpoint 2 is complete, i.e.
    while step 3 is in flight, and again ``again_after`` seconds later if given. Returns the exit
    status, stderr and the run's processes still alive 30 s after the driver exited."""
    mark, env = marked_env()
    cmd = command(run_dir, "trainer.keep_checkpoints=2")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not (run_dir / "checkpoints" / "step-000002" / "COMPLETE").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        send = (lambda: os.killpg(proc.pid, sig)) if group else (lambda: proc.send_signal(sig))
        send()
        if again_after is not None:
            time.sleep(again_after)
            send()
        err = proc.communicate(timeout=300)[1]
        deadline = time.monotonic() + 30
        while pids_with_env(mark) and time.monotonic() < deadline:
            time.sleep(0.5)
        return proc.returncode, err, pids_with_env(mark)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_marked(mark, grace=5.0)


def stop_line(err: str) -> str:
    """The one line a stopped run ends with (no traceback, no stack dump)."""
    assert "Traceback" not in err and "*** SIG" not in err and "PC: @" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c-to-the-group", "sigterm"]
)
def test_a_signal_stops_after_the_step_with_a_checkpoint(reference, tmp_path, sig, group):
    """Ctrl-C to the whole process group (actors included), or SIGTERM to the driver alone, mid-step;
    the stopped run resumed with the command it printed ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    rc, err, left = stopped(run_dir, sig, group)
    assert rc == 128 + sig, err[-3000:]
    assert not left, f"processes of the run still alive: {left}"
    name = signal.Signals(sig).name
    assert f"{name}: stopping after the current step with a checkpoint" in err
    last = stop_line(err)
    done = [r["step"] for r in rows(run_dir)]
    # Step 3 was in flight: it ended, was saved, and the run stopped. (A signal that lands in the
    # moment between checkpoint 2's rename and the loop's check stops at step 2, whose checkpoint is
    # then the newest one, kept as it is.)
    assert done in ([1, 2, 3], [1, 2]), done
    ck = run_dir / "checkpoints" / f"step-{done[-1]:06d}"
    assert last.startswith(f"{name}: stopped during distill; saved checkpoint {ck}; resume with: "), last
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir()) == sorted({"step-000002", ck.name})
    assert (ck / "COMPLETE").is_file() and json.loads((ck / "driver.json").read_text())["step"] == done[-1]
    assert not (run_dir / "export").exists()
    assert not (run_dir / ".safesteer.lock").exists()  # released on the way out
    if sig != signal.SIGINT:  # the resume is the same whichever signal stopped the run
        return

    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[:3] == ["python", "-m", "safesteer.run"] and resume[-1] == "trainer.resume=auto"
    ok(run(run_dir, cmd=[sys.executable, *resume[1:]]))  # the printed command, with this interpreter
    hist = rows(run_dir)
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert [r["weights_sha256"] for r in hist] == reference["steps"]
    assert weights(run_dir) == reference["final"]


def test_a_second_ctrl_c_stops_at_once_without_a_new_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    rc, err, left = stopped(run_dir, signal.SIGINT, group=True, again_after=0.3)
    assert rc == 130, err[-3000:]
    assert not left, f"processes of the run still alive: {left}"
    last = stop_line(err)
    assert last.startswith(
        "SIGINT: stopped at once during distill; no new checkpoint; newest checkpoint "
        f"{run_dir / 'checkpoints' / 'step-000002'}; resume with: "
    ), last
    # nothing half-written: the complete step-2 checkpoint, no temporary directory
    assert [d.name for d in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    assert not (run_dir / "export").exists()
