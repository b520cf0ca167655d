"""A run owns its run directory and leaves its caches whole, for real: ``python -m safesteer.run`` on the
tiny model, interrupted during prepare, run twice into one directory, SIGKILLed with its lock held, and
two prepares of one cache key at once; and ``python -m safesteer.compare`` stopped while a baseline
trains. (Stopping during distillation, and resuming from there, is tested with the other faults in
test_reliability.py.)"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PREPARE = ("+experiment=smoke", "stages=[prepare]")
# Many sampled continuations per prompt: the safety-token stage of prepare takes ~20 s on the tiny model.
SLOW = ("tokens.samples_per_prompt=48",)


@pytest.fixture
def cache(tmp_path, default_model_dir) -> Path:
    """A fresh SAFESTEER_CACHE that shares the converted models of the usual one."""
    from safesteer.models import prepare_tiny_model

    prepare_tiny_model()
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(Path(default_model_dir).parent, target_is_directory=True)
    return root


def start(run_dir: Path, cache: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """The run (prepare only: no Ray) in a session of its own, so that its process group is what Ctrl-C
    in a terminal would reach."""
    env = {**os.environ, "SAFESTEER_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "safesteer.run", *PREPARE, f"hydra.run.dir={run_dir}", *overrides]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log.read_text()


def wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def entries(cache: Path) -> list[str]:
    root = cache / "prepare"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def last_line(out: str) -> str:
    assert "Traceback" not in out, out[-3000:]
    return out.strip().splitlines()[-1]


def test_ctrl_c_during_prepare_stops_with_one_line_and_caches_nothing_half_written(tmp_path, cache):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(run_dir, cache, *SLOW, log=log)
    wait_for(lambda: "safety tokens (kl)" in log.read_text(), proc, log)  # the vector is searched
    os.killpg(proc.pid, signal.SIGINT)
    rc, out = finish(proc, log)
    assert rc == 130, out[-3000:]
    last = last_line(out)
    assert last.startswith(
        "SIGINT: stopped during prepare; nothing half-written kept; no checkpoint yet; resume with: "
    ), last
    assert entries(cache) == []  # no cache entry, not even a temporary one
    assert not (run_dir / "prepare.json").exists()

    # The printed command runs the stage again from the start, and caches one complete entry.
    resume = shlex.split(last.split("resume with: ", 1)[1])
    env = {**os.environ, "SAFESTEER_CACHE": str(cache)}
    p = subprocess.run(
        [sys.executable, *resume[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prepare: reusing" not in p.stderr
    (key,) = entries(cache)
    assert sorted(x.name for x in (cache / "prepare" / key).iterdir()) == [
        "prepare.json",
        "safety_tokens.json",
        "vector.safetensors",
    ]
    assert json.loads((run_dir / "prepare.json").read_text())["cache_key"] == key


def test_one_run_per_directory_and_a_stale_lock_does_not_block(tmp_path, cache):
    run_dir, log = tmp_path / "run", tmp_path / "holder.log"
    holder = start(run_dir, cache, *SLOW, log=log)
    lock = run_dir / ".safesteer.lock"
    try:
        wait_for(lambda: lock.is_file() and lock.read_text().strip().endswith("}"), holder, log)
        info = json.loads(lock.read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()

        # A second run into the directory refuses at start, naming the holder, and touches nothing.
        env = {**os.environ, "SAFESTEER_CACHE": str(cache)}
        cmd = [sys.executable, "-m", "safesteer.run", *PREPARE, f"hydra.run.dir={run_dir}", "seed=7"]
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr[-3000:]
        assert p.stderr.strip().splitlines() == [
            f"error: {run_dir}: run directory in use by another run (host {info['host']}, pid {holder.pid}, "
            f"started {info['started']}); wait for it to end, stop it, or choose another hydra.run.dir"
        ], p.stderr
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a crash: the lock file stays behind
        holder.wait(timeout=60)
    assert lock.is_file()

    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "prepare.json").is_file() and not lock.exists()


def test_two_prepares_of_one_key_at_once_leave_one_complete_cache_entry(tmp_path, cache):
    procs = [
        (start(tmp_path / f"run{i}", cache, log=tmp_path / f"run{i}.log"), tmp_path / f"run{i}.log")
        for i in (0, 1)
    ]
    outs = [finish(p, log) for p, log in procs]
    for rc, out in outs:
        assert rc == 0, out[-3000:]
        assert "prepare: reusing" not in out  # both computed it: the writes raced
    (key,) = entries(cache)
    entry = cache / "prepare" / key
    assert sorted(x.name for x in entry.iterdir()) == [
        "prepare.json",
        "safety_tokens.json",
        "vector.safetensors",
    ]
    tokens = (entry / "safety_tokens.json").read_text()
    assert all((tmp_path / f"run{i}" / "safety_tokens.json").read_text() == tokens for i in (0, 1))


def test_a_stopped_comparison_names_the_point_and_resumes_by_running_again(tmp_path):
    """SIGTERM while an SFT point trains (real TRL): exit 143 with one line naming the point, no result
    or model half-written, and a resume command that adds nothing (an added override would change the
    finished points' keys)."""
    run_dir, log = tmp_path / "cmp", tmp_path / "log"
    cmd = [sys.executable, "-m", "safesteer.compare", "+experiment=smoke", f"hydra.run.dir={run_dir}",
           "compare.methods=[sft]", "compare.sweeps.sft.lr=[1e-4]", "compare.sweeps.sft.epochs=[500]"]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def training() -> bool:  # the SFT trainer's progress bar shows a step
        text = log.read_text()
        return "Building labels" in text and "| 1/" in text.split("Building labels")[-1]

    wait_for(training, proc, log, timeout=400)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, log, timeout=60)
    assert rc == 143, out[-3000:]
    line = out[out.index("SIGTERM: ") :].splitlines()[0]  # it follows the progress bar on its line
    assert line.startswith("SIGTERM: stopped during sft (lr=0.0001, epochs=500); nothing half-written kept;")
    assert line.endswith(f"hydra.run.dir={run_dir}") and "trainer.resume" not in line, line
    point_dir = next((run_dir / "sft").iterdir())
    assert list(point_dir.iterdir()) == []  # no result.json, no model (written atomically)
