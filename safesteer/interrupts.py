"""Stopping a run when asked: Ctrl-C (SIGINT), SIGTERM (``kill``, ``scancel``, ``ray job stop``, a
preemption) and SIGUSR1 (the early warning ``sbatch --signal`` sends).

The first signal during training asks the driver to stop at the next safe point: the step in flight
ends, a checkpoint is written (unless the newest one is that step) and the run exits. Anywhere else
(prepare, evaluation, export, starting the actors) it stops at once; every artifact and cache entry is
written to a temporary name and renamed, so nothing half-written is left or reused. A second signal
stops at once, without a new checkpoint. Either way the run exits with 128 + the signal number (130
for SIGINT, 143 for SIGTERM; SIGUSR1 counts as SIGTERM) and one line saying what was saved and the
command that resumes it.

While a stop waits for the step in flight, :meth:`Stop.watch`'s check runs every second: when the Ray
cluster went down with the same signal (a Slurm ``scancel`` signals every process of the job), there is
no step to wait for, and the run stops at once.

The handlers are process-wide, so the state is one module-level object, :data:`STOP`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safesteer.checkpoint import latest

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
LAST_RESORT_S = 10.0  # after the cluster went down: the driver exits by itself within this


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal (a SIGUSR1 warning is a request to terminate)."""
    return 128 + (signal.SIGTERM if signum == signal.SIGUSR1 else signum)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal. Not an ``Exception``, so that no ``except Exception`` of the fault
    handling (a dead worker's share redone, a learner group restarted) mistakes it for a failure; a
    ``KeyboardInterrupt``, so that a ``ray.get`` it interrupts gives up at once (Ray's signal check
    lets only that through; anything else it ignores until the call returns, e.g. the 20 minutes of
    an evaluation) and raises a plain ``KeyboardInterrupt``, which :func:`cause` maps back."""

    def __init__(self, signum: int, at_once: bool, stage: str, saved: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.at_once, self.stage, self.saved = signum, at_once, stage, saved


class Stop:
    """What the signal handlers were told: :meth:`requested` is polled by the training loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stage = "start"
        self._deferred = False
        self._raised = False
        self.last: Interrupted | None = None  # what the handler raised
        self._alive: Callable[[], bool] | None = None
        self._redeliver = False
        self._unraisable_before = sys.unraisablehook
        self.run_dir = "."

    def install(self) -> None:
        """(Re)install the handlers: Ray's ``ray.init`` and some imports put in their own."""
        for s in SIGNALS:
            signal.signal(s, self._handle)
        if sys.unraisablehook != self._unraisable:
            self._unraisable_before = sys.unraisablehook
            sys.unraisablehook = self._unraisable

    def _unraisable(self, u) -> None:
        """A handler's stop raised inside a finalizer (a ``__del__``, a weakref or GC callback: Python
        prints "Exception ignored" and goes on) would be lost, and every later signal only reported:
        deliver it again, by the same signal sent a moment later (from here it would run the handler
        inside this hook, where a raise is ignored too)."""
        if u.exc_value is not None and u.exc_value is self.last:
            self._redeliver = True
            again = threading.Timer(0.1, os.kill, (os.getpid(), self.last.signum))
            again.daemon = True
            again.start()
            return
        self._unraisable_before(u)

    def watch(self, alive: Callable[[], bool]) -> None:
        """``alive()`` says whether the workers can still finish a step (e.g. the Ray cluster answers)."""
        self._alive = alive

    def _watchdog(self) -> None:
        while not self._raised:
            time.sleep(1.0)
            if not self._raised and not self._alive():
                print("the Ray cluster is gone: stopping at once", file=sys.stderr, flush=True)
                os.kill(os.getpid(), self.signum)  # the second signal: at once
                # A call into the dead cluster may never return to Python to see it: then leave, with
                # the line, before the scheduler's SIGKILL (checkpoints and caches are atomic).
                time.sleep(LAST_RESORT_S)
                if self._raised:  # it did: the run is on its way out by itself
                    return
                e = Interrupted(self.signum, True, self.stage)
                print(message(e, self.run_dir) + " (left a stuck Ray call)", file=sys.stderr, flush=True)
                os._exit(exit_code(self.signum))

    def settle(self, seconds: float = 2.0) -> bool:
        """Wait up to ``seconds`` for a stop signal (a worker that just died may have died of the
        signal that stops the run, which reaches the driver a moment later); True if one came."""
        deadline = time.monotonic() + seconds
        while not self.requested() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.requested()

    def at(self, stage: str) -> None:
        """Name the stage a stop would interrupt (it appears in the one-line message)."""
        self.stage = stage

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section whose first signal only asks it to stop at its next safe point."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise the stop the handler raised, if a call it interrupted swallowed it (``ray.wait``)."""
        if self.last is not None:
            raise self.last

    def interrupted(self, saved: str | None = None) -> Interrupted:
        """The exception that ends the run at a safe point after :meth:`requested`."""
        self._raised = True
        return Interrupted(self.signum, False, self.stage, saved)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._redeliver and self.last is not None:  # the first raise was swallowed (_unraisable)
            self._redeliver = False
            raise self.last
        if self._raised:  # already on the way out: the actors are being shut down
            print(f"{name}: already stopping (shutting the actors down)", file=sys.stderr, flush=True)
            return
        if self.signum is None and self._deferred:
            self.signum = signum
            again = "press Ctrl-C again" if signum == signal.SIGINT else "signal again"
            print(
                f"{name}: stopping after the current step with a checkpoint ({again} to stop at once, "
                "without one)",
                file=sys.stderr,
                flush=True,
            )
            if self._alive is not None:
                threading.Thread(target=self._watchdog, name="safesteer-stop-watchdog", daemon=True).start()
            return
        first = self.signum is None
        self.signum = self.signum or signum
        self._raised = True
        self.last = Interrupted(self.signum, not first, self.stage)
        raise self.last


STOP = Stop()


def cause(e: BaseException | None) -> Interrupted | None:
    """The :class:`Interrupted` behind ``e``, if any: raised inside a C extension's signal check (Ray's
    ``ray.get``), it reaches the caller as a plain ``KeyboardInterrupt`` or wrapped in another
    exception."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Interrupted):
            return e
        if isinstance(e, KeyboardInterrupt) and STOP.last is not None:
            return STOP.last
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def command_module(prog: str | None = None) -> str:
    """The ``python -m`` module this process runs (``safesteer.run`` unless ``sys.argv[0]`` names
    another of the project's commands)."""
    prog = (sys.argv[0] if sys.argv else "") if prog is None else prog
    if prog.endswith(".py") and "safesteer" in prog:
        return "safesteer." + prog.rsplit("/", 1)[-1][: -len(".py")]
    return "safesteer.run"


def resume_command(run_dir: str, argv: list[str] | None = None, module: str | None = None) -> str:
    """The command line that continues this run: its own overrides and its run directory; a training
    run also ``trainer.resume=auto``. Other commands resume by running again in the same directory
    (a comparison reuses its finished points: an added override would change their keys)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keep = [a for a in argv if not a.startswith(("trainer.resume=", "hydra.run.dir="))]
    module = module or command_module()
    resume = ["trainer.resume=auto"] if module == "safesteer.run" else []
    return shlex.join(["python", "-m", module, *keep, f"hydra.run.dir={run_dir}", *resume])


def message(e: Interrupted, run_dir: str) -> str:
    """The one line a stopped run prints: what was saved, and the command that resumes it."""
    name = signal.Signals(e.signum).name
    if e.saved:
        what = f"saved checkpoint {e.saved}"
    elif command_module() != "safesteer.run":  # no checkpoints: what finished is kept
        what = "nothing half-written kept"
    else:
        newest = latest(Path(run_dir) / "checkpoints")
        kept = f"newest checkpoint {newest.path}" if newest else "no checkpoint yet"
        why = "no new checkpoint" if e.at_once and e.stage == "distill" else "nothing half-written kept"
        what = f"{why}; {kept}"
    how = "stopped at once" if e.at_once else "stopped"
    return f"{name}: {how} during {e.stage}; {what}; resume with: {resume_command(run_dir)}"
