"""Fault injection, for the reliability tests: ``SAFESTEER_FAULT=role:index:step[,...]``.

``rollout``, ``teacher`` or ``learner``: the process of actor ``index`` of that group is SIGKILLed
from the driver while it works on ``step`` (1-based); ``nan`` makes learner rank ``index``'s loss
NaN at that step; ``driver`` SIGKILLs the driver itself while the learners work on that step (then
``trainer.resume=auto`` continues the run). Each fault fires once. :class:`FaultyWorkers` wraps the
worker groups through their two seams, so the driver loop and the stages take no fault arguments.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

from safesteer.errors import SafeSteerError
from safesteer.workers import Workers

log = logging.getLogger(__name__)

FAULT_ENV = "SAFESTEER_FAULT"
FAULT_ROLES = ("rollout", "teacher", "learner", "nan", "driver")


@dataclass
class Faults:
    """Injected faults (``role:index:step``, comma-separated); each fires once."""

    pending: list[tuple[str, int, int]] = field(default_factory=list)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        out = cls()
        for part in filter(None, (x.strip() for x in spec.split(","))):
            bits = part.split(":")
            ok = len(bits) == 3 and bits[0] in FAULT_ROLES and bits[1].isdigit() and bits[2].isdigit()
            if not ok or int(bits[2]) < 1:
                raise SafeSteerError(
                    f"{FAULT_ENV}={spec!r}: expected role:index:step with role in {'/'.join(FAULT_ROLES)} "
                    "and step >= 1, e.g. rollout:0:2"
                )
            out.pending.append((bits[0], int(bits[1]), int(bits[2])))
        return out

    def take(self, role: str, step: int) -> int | None:
        """The index of the actor of ``role`` to fail at ``step`` (1-based), once; else None."""
        for f in self.pending:
            if f[0] == role and f[2] == step:
                self.pending.remove(f)
                log.warning("fault injection: %s %d at step %d", role, f[1], step)
                return f[1]
        return None


class FaultyWorkers(Workers):
    """:class:`Workers` that kill actors (or poison a loss) as ``$SAFESTEER_FAULT`` says."""

    def __init__(self, *args, **kwargs):
        self.faults = Faults.parse(os.environ.get(FAULT_ENV, ""))
        super().__init__(*args, **kwargs)

    def _launched(self, group: str, step: int) -> None:
        index = self.faults.take(group, step)
        if index is not None:
            self.kill(group, index)
        if group == "learner" and self.faults.take("driver", step) is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def _poisoned_rank(self, step: int) -> int | None:
        return self.faults.take("nan", step)

    def kill(self, group: str, index: int) -> None:
        """SIGKILL the actor's process (``ray.kill`` when it may be on another host)."""
        actor = self.group(group)[index]
        pid = self._ray.get(actor.pid.remote())
        if self.cfg.cluster.address is None:  # embedded Ray: every actor runs on this host
            os.kill(pid, signal.SIGKILL)
        else:
            self._ray.kill(actor, no_restart=True)


def workers_class() -> type[Workers]:
    """:class:`FaultyWorkers` when ``$SAFESTEER_FAULT`` is set (checked here, at start), else :class:`Workers`."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return Workers
    Faults.parse(spec)
    return FaultyWorkers
