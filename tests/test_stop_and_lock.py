"""The pieces of stopping and locking, in one process: the signal handler's two-signal semantics, the
resume command, the run-directory lock and cache entries written by two writers. (Real runs stopped by
real signals: test_reliability.py and test_interrupts.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest

from safesteer.errors import SafeSteerError
from safesteer.interrupts import Interrupted, Stop, exit_code, resume_command
from safesteer.paths import LOCK_FILE, RunLock, atomic_dir, lock_holder


@pytest.fixture
def stop():
    """A fresh :class:`Stop` with its handlers installed; the previous handlers are put back after."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    hook = sys.unraisablehook
    s = Stop()
    s.install()
    yield s
    for sig, h in before.items():
        signal.signal(sig, h)
    sys.unraisablehook = hook


def test_exit_codes_follow_the_shell_convention():
    assert exit_code(signal.SIGINT) == 130
    assert exit_code(signal.SIGTERM) == 143
    assert exit_code(signal.SIGUSR1) == 143  # Slurm's early warning asks to terminate


def test_outside_training_the_first_signal_stops_at_once(stop):
    stop.at("prepare")
    with pytest.raises(Interrupted) as e:
        signal.raise_signal(signal.SIGTERM)
    assert (e.value.signum, e.value.at_once, e.value.stage) == (signal.SIGTERM, False, "prepare")
    signal.raise_signal(signal.SIGINT)  # once stopping, a further signal is only reported


def test_a_stop_raised_inside_a_finalizer_is_delivered_again(stop):
    """Python cannot raise out of a ``__del__`` (it prints "Exception ignored" and goes on): the stop
    must still reach the main code, not be lost with every later signal only reported."""

    raised_inside = []

    class Finalized:
        def __del__(self):
            try:
                signal.raise_signal(signal.SIGTERM)  # the signal arrives while a finalizer runs
            except Interrupted as e:  # the handler raised inside it: Python ignores this
                raised_inside.append(e)
                raise

    stop.at("prepare")
    with pytest.raises(Interrupted) as e:
        Finalized()  # collected at once: its __del__ runs here
        for _ in range(10_000):
            time.sleep(0.001)
    assert (e.value.signum, e.value.at_once, e.value.stage) == (signal.SIGTERM, False, "prepare")
    assert raised_inside == [e.value]  # raised inside the finalizer first, then again outside


def test_in_training_the_first_signal_asks_and_the_second_stops_at_once(stop, capsys):
    stop.at("distill")
    with stop.deferred():
        signal.raise_signal(signal.SIGINT)
        assert stop.requested()
        assert "SIGINT: stopping after the current step with a checkpoint" in capsys.readouterr().err
        with pytest.raises(Interrupted) as e:
            signal.raise_signal(signal.SIGINT)
    assert (e.value.signum, e.value.at_once, e.value.saved) == (signal.SIGINT, True, None)


def test_a_stop_does_not_wait_for_a_step_once_the_cluster_is_gone(stop, capsys):
    alive = [True]
    stop.watch(lambda: alive[0])
    stop.at("distill")
    with stop.deferred(), pytest.raises(Interrupted) as e:
        signal.raise_signal(signal.SIGTERM)
        time.sleep(2.5)  # the cluster answers: the stop waits for the step
        alive[0] = False  # the cluster went down with the signal (a Slurm scancel)
        for _ in range(100):
            time.sleep(0.1)
        pytest.fail("the watchdog did not stop the run")
    assert (e.value.signum, e.value.at_once) == (signal.SIGTERM, True)
    assert "the Ray cluster is gone: stopping at once" in capsys.readouterr().err


def test_the_safe_point_raises_with_what_it_saved(stop):
    stop.at("distill")
    with stop.deferred():
        signal.raise_signal(signal.SIGUSR1)
    e = stop.interrupted(saved="/r/checkpoints/step-000003")
    assert (e.signum, e.at_once, e.saved, e.stage) == (
        signal.SIGUSR1,
        False,
        "/r/checkpoints/step-000003",
        "distill",
    )


# A driver blocked in ray.get on a long call (an evaluation's generation takes minutes on a real model).
BLOCKED_GET = r"""
import os, signal, sys, threading, time
import ray
from safesteer.interrupts import STOP, cause
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
STOP.install()
STOP.at("evaluation of the original model")
@ray.remote
def generate():
    time.sleep(120)
threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t = time.monotonic()
try:
    ray.get(generate.remote())
    print("RESULT returned")
except BaseException as e:
    stop = cause(e)
    print(f"RESULT {stop.signum if stop else None} {stop.stage if stop else None} {time.monotonic() - t:.1f}")
ray.shutdown()
"""


def test_a_signal_interrupts_a_blocked_ray_get_at_once():
    """Real Ray: Ray's ``ray.get`` gives up on a signal only for a KeyboardInterrupt (anything else it
    ignores until the call returns); the stop comes out at once and maps back to what was signalled."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", BLOCKED_GET], capture_output=True, text=True, timeout=110)
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    parts = line.split()
    assert parts[1] == str(int(signal.SIGINT)), p.stdout + p.stderr[-2000:]
    assert " ".join(parts[2:-1]) == "evaluation of the original model"
    assert float(parts[-1]) < 30  # the call would have taken 120 s


def test_the_resume_command_keeps_the_overrides_and_names_the_directory():
    argv = [
        "+experiment=smoke",
        "trainer.resume=null",
        "hydra.run.dir=old",
        "learner.lr=1e-4",
        "data.train=[a,b]",
    ]
    assert resume_command("/runs/r 1", argv) == (
        "python -m safesteer.run +experiment=smoke learner.lr=1e-4 'data.train=[a,b]' "
        "'hydra.run.dir=/runs/r 1' trainer.resume=auto"
    )
    # another command resumes by running again in its directory: nothing added (a comparison's
    # finished points are keyed by its overrides)
    assert resume_command("/runs/c", argv, module="safesteer.compare") == (
        "python -m safesteer.compare +experiment=smoke learner.lr=1e-4 'data.train=[a,b]' hydra.run.dir=/runs/c"
    )


def test_a_locked_run_directory_is_refused_naming_its_holder(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    try:
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert lock_holder(tmp_path) == f"host {held['host']}, pid {held['pid']}, started {held['started']}"
        with pytest.raises(
            SafeSteerError, match=rf"run directory in use by another run \(host .*, pid {os.getpid()},"
        ):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists() and lock_holder(tmp_path) is None


def test_a_lock_file_nobody_holds_is_stale_and_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": "gone", "pid": 1, "started": "yesterday"}')
    assert lock_holder(tmp_path) is None
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_cache_entry_completed_by_another_writer_is_kept(tmp_path):
    entry = tmp_path / "entry"
    with atomic_dir(entry, keep_existing=True) as tmp:
        (tmp / "f").write_text("first")
    with atomic_dir(entry, keep_existing=True) as tmp:  # a second writer of the same key
        (tmp / "f").write_text("second")
    assert (entry / "f").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary directory left
    with atomic_dir(entry) as tmp:  # an artifact (not a cache entry) is replaced
        (tmp / "f").write_text("third")
    assert (entry / "f").read_text() == "third"
