"""The actor groups (rollout workers, teachers, learner ranks), called like functions by the driver.

Each stage deals its work over a group, waits, and puts the results back in batch order. A rollout
worker or teacher that dies is recreated in its placement-group bundle, brought to the current
weights, and its share is redone (every sample has its own seed, so the redo draws the same tokens):
one helper, :meth:`Workers._redo`, does this for every stage. A learner rank that dies raises
:class:`LearnerFailure`; the driver then restarts the group from the newest checkpoint.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from safesteer.cluster import Role, cluster_check, free_port, placement, spawn
from safesteer.core.batch import interleave, merge_teacher_shards, split
from safesteer.core.tokens import SafetyTokens
from safesteer.errors import SafeSteerError
from safesteer.interrupts import STOP
from safesteer.learner import LearnerWorker
from safesteer.models import compute_dtype
from safesteer.rollout import RolloutWorker
from safesteer.schema import typed
from safesteer.teacher import OUTPUT_FOR_LOSS, TeacherWorker, VLLMTeacherWorker

log = logging.getLogger(__name__)

GROUPS = ("rollout", "teacher", "learner")


def roles(cfg) -> list[Role]:
    """One placement-group role per actor group, sized by its config group."""
    counts = {
        "rollout": (cfg.rollout.num_workers, cfg.rollout.num_gpus * cfg.rollout.tensor_parallel_size),
        # teacher.backend=learner: the learner ranks score, no teacher actor
        "teacher": (0 if cfg.teacher.backend == "learner" else cfg.teacher.num_actors, cfg.teacher.num_gpus),
        "learner": (cfg.learner.world_size, cfg.learner.num_gpus),
    }
    return [
        Role(name, n, cfg[name].num_cpus, gpus, dict(cfg[name].resources), {"threads": cfg[name].threads})
        for name, (n, gpus) in counts.items()
    ]


def rendezvous(pg, bundle_index: int) -> tuple[str, int]:
    """Address and a free port on the node of learner rank 0 (its placement-group bundle)."""

    @ray.remote(num_cpus=0)
    def where() -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index)
    return ray.get(where.options(scheduling_strategy=strategy).remote())


def sequences_per_step(cfg) -> int:
    """Sequences in one optimizer step: (training prompts + anchor prompts) x samples per prompt."""
    t = cfg.trainer
    anchors = t.anchors_per_step if cfg.data.anchor else 0
    return (t.prompts_per_step + anchors) * cfg.rollout.samples_per_prompt


class LearnerFailure(RuntimeError):
    """A learner rank died; the DeepSpeed group must be recreated."""


def _actor_died(e: BaseException) -> bool:
    return isinstance(e, RayActorError)


def init_error(e: BaseException) -> SafeSteerError | None:
    """The SafeSteerError an actor raised while starting (on another node, say), as one line."""
    if not _actor_died(e):
        return None
    found = re.findall(r"SafeSteerError: (.+)", str(e))
    return SafeSteerError(found[-1].strip()) if found else None


@dataclass
class Rollout:
    """A step's samples from the student, grouped by prompt in prompt order."""

    samples: list[list[dict]]  # per prompt: {"completion_ids", "prompt_index", ...} per sample
    seconds: float  # the slowest worker's generation time
    tokens: int
    version: int  # the oldest weights version that generated them

    @property
    def completions(self) -> list[list[int]]:
        return [s["completion_ids"] for samples in self.samples for s in samples]


@dataclass
class TeacherScores:
    """The teachers' log-probs over a batch's completions, in batch order."""

    teacher: dict  # "logprobs" (B,C,K) completion-aligned, and "ids" for a top-K teacher
    gate: list[bool] | None  # the harm probe's verdicts (teacher.gate=probe)
    seconds: float
    tokens: int


@dataclass
class StepResult:
    """One optimizer step of the learner group: the ranks' results as one."""

    loss: float  # mean over ranks
    anchor_loss: float | None  # mean over the anchor sequences, when the batch has some
    safety_mass: float
    grad_norm: float
    lr: float
    tokens: int  # summed over ranks
    seconds: float  # the slowest rank
    skipped: bool  # a non-finite loss or gradient: no update

    @classmethod
    def merge(cls, res: list[dict]) -> StepResult:
        n, anchors = len(res), sum(r["anchor_sequences"] for r in res)
        return cls(
            loss=sum(r["loss"] for r in res) / n,
            anchor_loss=sum(r["anchor_loss_sum"] for r in res) / anchors if anchors else None,
            safety_mass=sum(r["safety_mass"] for r in res) / n,
            grad_norm=res[0]["grad_norm"],
            lr=res[0]["lr"],
            tokens=sum(r["tokens"] for r in res),
            seconds=max(r["seconds"] for r in res),
            skipped=any(r["skipped"] for r in res),
        )


@dataclass
class Sync:
    """A weight sync from the learners to the rollout workers."""

    seconds: float
    bytes: int  # the safetensors bytes sent (0 for NCCL)
    sha256: list[str | None]  # per rollout worker, of the weights it loaded (None for NCCL)


class Workers:
    """Handles of every actor; replaces rollout workers and teachers that die.

    ``_launched`` (called after a stage has dispatched its work) and ``_poisoned_rank`` are the
    seams :mod:`safesteer.faults` uses to inject faults; here they do nothing.
    """

    def __init__(
        self,
        cfg,
        model_path: str,
        vector_blob: bytes | None,
        tokens: SafetyTokens | None,
        total_steps: int,
        device: str,
    ):
        self._ray = ray
        self._cluster_alive = cluster_check()
        self.cfg = cfg
        rs = roles(cfg)
        self.pg, self.index = placement(rs, cfg.cluster.strategy, cfg.cluster.placement_timeout_s)
        self.by = {r.name: r for r in rs}
        # the engines' dtype, also the dtype the learners' weights are sent in
        self.dtype = compute_dtype(cfg.model.dtype, device)
        self.model_path, self.vector_blob, self.tokens = model_path, vector_blob, tokens
        self.total_steps, self.device = total_steps, device
        self.nccl = cfg.rollout.weight_sync == "nccl"
        self.rollout = [self._spawn("rollout", i) for i in range(len(self.index["rollout"]))]
        self.teachers = [self._spawn("teacher", j) for j in range(len(self.index["teacher"]))]
        self.learners = self._spawn_learners()
        self.weights = None  # (object ref of the last synced safetensors blob, version)
        self.recovered = 0  # actors replaced during the current step

    # -- actors -------------------------------------------------------------------------------------

    def _spawn(self, group: str, i: int):
        cfg, bundle, role = self.cfg, self.index[group][i], self.by[group]
        trust = cfg.model.trust_remote_code
        if group == "rollout":
            rcfg, seed = typed(cfg.rollout), cfg.seed + i
            return spawn(
                RolloutWorker,
                self.pg,
                bundle,
                role,
                self.model_path,
                rcfg,
                self.dtype,
                seed,
                self.device,
                trust,
            )
        output = OUTPUT_FOR_LOSS[cfg.learner.loss]
        tcfg = typed(cfg.teacher)
        args = (self.model_path, tcfg, self.vector_blob, self.tokens, output, typed(cfg.model))
        if tcfg.backend == "vllm":  # an engine sized like the rollout engine's
            engine = (typed(cfg.rollout), self.dtype, cfg.seed, self.device)
            return spawn(VLLMTeacherWorker, self.pg, bundle, role, *args, *engine)
        return spawn(TeacherWorker, self.pg, bundle, role, *args)

    def _spawn_learners(self) -> list:
        cfg = self.cfg
        master_addr, port = rendezvous(self.pg, self.index["learner"][0])
        seqs = sequences_per_step(cfg)
        learners = [
            spawn(
                LearnerWorker,
                self.pg,
                b,
                self.by["learner"],
                rank,
                self.model_path,
                typed(cfg.learner),
                master_addr,
                port,
                self.total_steps,
                seqs,
                self.tokens,
                cfg.seed,
                typed(cfg.model),
                self._learner_teacher(),
            )  # fmt: skip
            for rank, b in enumerate(self.index["learner"])
        ]
        if self.nccl:
            addr, wport = rendezvous(self.pg, self.index["learner"][0])
            tp = cfg.rollout.tensor_parallel_size
            self._ray.get([w.init_weight_transfer.remote(self.rollout, addr, wport, tp) for w in learners])
        return learners

    def _learner_teacher(self) -> tuple | None:
        """What the learner ranks need to score as the teacher (``teacher.backend=learner``)."""
        cfg = self.cfg
        if cfg.teacher.backend != "learner":
            return None
        return typed(cfg.teacher), self.vector_blob, OUTPUT_FOR_LOSS[cfg.learner.loss]

    def group(self, name: str) -> list:
        return {"rollout": self.rollout, "teacher": self.teachers, "learner": self.learners}[name]

    def wait_ready(self) -> None:
        """Every actor is up, and the teachers and learners hold the driver's safety tokens."""
        ray = self._ray
        try:
            ray.get([w.info.remote() for w in self.rollout])
            held = ray.get([t.safety_tokens_hash.remote() for t in self.teachers])
        except Exception as e:
            err = init_error(e)
            if err is None:
                raise
            raise err from e
        held += self._learners_get([w.safety_tokens_hash.remote() for w in self.learners])
        want = self.tokens.content_hash() if self.tokens is not None else None
        if any(h != want for h in held):
            raise SafeSteerError(
                f"the actors hold different safety tokens (hashes {sorted(set(map(str, held)))}, driver {want})"
            )

    def _replace(self, group: str, i: int):
        """A new actor of ``group`` in bundle ``i``; a rollout worker is brought to the last synced weights."""
        if group == "rollout" and self.nccl:
            raise SafeSteerError(
                f"rollout worker {i} died; replacing one is supported with rollout.weight_sync=object_store only"
            )
        name = "rollout worker" if group == "rollout" else group
        if STOP.settle() or not self._cluster_alive():  # it died of the stop signal: no respawn
            raise STOP.interrupted() if STOP.requested() else SafeSteerError("the Ray cluster is gone")
        log.warning("%s %d died; starting a new one at policy version %s", name, i, self._version())
        actors = self.group(group)
        self._ray.kill(actors[i])
        actors[i] = actor = self._spawn(group, i)
        self.recovered += 1
        if group == "rollout" and self.weights is not None:
            self._ray.get(actor.load_weights.remote(*self.weights))
        return actor

    def _redo(self, group: str, calls: list[tuple[int, object, object]]) -> list:
        """``ray.get`` each ``(actor index, future, call)``; when the actor died, replace it and get
        ``call(new actor)`` instead (the same work again)."""
        out = []
        for i, fut, call in calls:
            try:
                out.append(self._ray.get(fut))
            except Exception as e:
                if not _actor_died(e):
                    raise
                out.append(self._ray.get(call(self._replace(group, i))))
        return out

    def restart_learners(self) -> None:
        """Kill every rank (the survivors are stuck in collectives) and start a fresh group."""
        for w in self.learners:
            self._ray.kill(w)
        self.learners = self._spawn_learners()
        self._learners_get([w.pid.remote() for w in self.learners])

    def _learners_get(self, futures: list):
        """``ray.get`` over the learner group that fails fast when a rank dies (its peers would block)."""
        ray, pending = self._ray, list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            STOP.check()  # ray.wait lets a stop signal pass unseen: look at least once a second
            if not ready:
                continue
            try:
                ray.get(ready[0])
            except Exception as e:
                if _actor_died(e):
                    raise LearnerFailure(str(e).splitlines()[0]) from None
                raise
        return ray.get(futures)

    def _version(self) -> int:
        return self.weights[1] if self.weights is not None else 0

    def _launched(self, group: str, step: int) -> None:
        """Called once a stage's work for ``step`` is dispatched (fault injection hooks in here)."""

    def _poisoned_rank(self, step: int) -> int | None:
        """A learner rank whose loss is made NaN at ``step`` (fault injection only)."""
        return None

    # -- the stages ---------------------------------------------------------------------------------

    def generate(self, step: int, prompt_ids: list[list[int]], seeds: list[list[int]]) -> tuple:
        """Deal prompts over the rollout workers; returns the pending work for :meth:`collect`."""
        r, nw = self.cfg.rollout, len(self.rollout)

        def call(p, s):
            return lambda w: w.generate.remote(
                p, r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens, s
            )

        shards = [(i, call(prompt_ids[i::nw], seeds[i::nw])) for i in range(nw) if prompt_ids[i::nw]]
        pending = [(i, c(self.rollout[i]), c) for i, c in shards]
        self._launched("rollout", step)
        return pending, len(prompt_ids)

    def collect(self, pending: list, n_prompts: int) -> Rollout:
        """The samples, grouped by prompt in prompt order (lost shards are redone)."""
        res = self._redo("rollout", pending)
        per_worker = [[] for _ in self.rollout]
        for (i, _, _), r in zip(pending, res):
            by_prompt: dict[int, list] = {}
            for s in r["samples"]:
                by_prompt.setdefault(s["prompt_index"], []).append(s)
            per_worker[i] = [by_prompt[j] for j in sorted(by_prompt)]
        return Rollout(
            samples=interleave(per_worker, n_prompts),
            seconds=max(r["seconds"] for r in res),
            tokens=sum(r["tokens"] for r in res),
            version=min(r["version"] for r in res),
        )

    def score(
        self, step: int, instructions: list[str], completions: list[list[int]], steer: list[bool]
    ) -> TeacherScores:
        """The teachers' log-probs at the safety ids, in batch order (and the harm probe's verdicts)."""
        scorers = self.teachers or self.learners  # teacher.backend=learner: the ranks score
        n = len(scorers)
        calls = []
        for j in range(n):
            ins, comp, flags = instructions[j::n], completions[j::n], steer[j::n]
            if ins:
                call = lambda t, ins=ins, comp=comp, flags=flags: t.score.remote(ins, comp, flags)  # noqa: E731
                calls.append((j, call(scorers[j]), call))
        self._launched("teacher", step)
        if self.teachers:
            res = self._redo("teacher", calls)
        else:
            res = self._learners_get([fut for _, fut, _ in calls])
        B = len(instructions)
        gate = interleave([r["gate"] for r in res], B) if res[0].get("gate") is not None else None
        return TeacherScores(
            teacher=merge_teacher_shards([r["teacher"] for r in res], B),
            gate=gate,
            seconds=max(r["seconds"] for r in res),
            tokens=sum(r["tokens"] for r in res),
        )

    def train_step(self, step: int, batch: dict) -> StepResult:
        """One optimizer step of the learner group on ``batch`` (split evenly over the ranks)."""
        poison = self._poisoned_rank(step)
        shards = split(batch, len(self.learners))
        futs = [
            w.train_step.remote(s, rank == poison) for rank, (w, s) in enumerate(zip(self.learners, shards))
        ]
        self._launched("learner", step)
        return StepResult.merge(self._learners_get(futs))

    def sync(self, version: int) -> Sync:
        """Learners' weights -> every rollout worker: safetensors bytes put once in the object store
        (default), or an NCCL broadcast (``rollout.weight_sync=nccl``)."""
        t = time.perf_counter()
        if self.nccl:
            self._learners_get([w.send_weights.remote() for w in self.learners])
            self._ray.get([w.set_version.remote(version) for w in self.rollout])
            return Sync(time.perf_counter() - t, 0, [None] * len(self.rollout))
        blob = self.export(self.dtype)
        ref = self._ray.put(blob)
        self.weights = (ref, version)
        call = lambda w: w.load_weights.remote(ref, version)  # noqa: E731
        res = self._redo("rollout", [(i, call(w), call) for i, w in enumerate(self.rollout)])
        return Sync(time.perf_counter() - t, len(blob), [r["sha256"] for r in res])

    def load_rollout_weights(self, blob: bytes) -> None:
        """Put ``blob`` (safetensors) into every rollout engine, e.g. the selected step's weights."""
        ref = self._ray.put(blob)
        self._ray.get([w.load_weights.remote(ref, -1) for w in self.rollout])

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers from rollout worker 0 (at the last synced weights)."""
        return self._ray.get(self.rollout[0].greedy.remote(prompt_ids, max_new_tokens))

    def export(self, dtype: str = "bfloat16") -> bytes:
        return self._learners_get([w.export_weights.remote(dtype) for w in self.learners])[0]

    def export_adapter(self) -> dict[str, bytes] | None:
        """The LoRA adapter's files (``learner.lora.r > 0``), else None."""
        return self._learners_get([w.export_adapter.remote() for w in self.learners])[0]

    def save_checkpoint(self, directory: Path) -> None:
        self._learners_get([w.save_state.remote(str(directory)) for w in self.learners])

    def load_checkpoint(self, directory: Path) -> None:
        self._learners_get([w.load_state.remote(str(directory)) for w in self.learners])

    def shutdown(self, timeout_s: float = 20.0) -> None:
        """Kill every actor and remove the placement group. A cluster that went down (a Slurm job
        cancelled as a whole) answers no more, and Ray's calls would wait for it forever: skipped then,
        given up when it goes down meanwhile, and bounded by ``timeout_s`` in any case."""
        if not self._cluster_alive():
            log.warning("the Ray cluster is gone; no actor left to stop")
            return

        failed: list[BaseException] = []

        def stop() -> None:
            try:
                for a in self.rollout + self.teachers + self.learners:
                    self._ray.kill(a)
                remove_placement_group(self.pg)
            except Exception as e:  # e.g. RPC CANCELLED: the cluster went down under the calls
                failed.append(e)

        t = threading.Thread(target=stop, name="safesteer-shutdown", daemon=True)
        t.start()
        deadline = time.monotonic() + timeout_s
        while t.is_alive() and time.monotonic() < deadline and self._cluster_alive():
            t.join(1.0)
        if t.is_alive():
            log.warning("the Ray cluster did not answer the shutdown within %.0fs; leaving it", timeout_s)
        elif failed:
            log.warning(
                "stopping the Ray actors failed (%s: %s); leaving them", type(failed[0]).__name__, failed[0]
            )
