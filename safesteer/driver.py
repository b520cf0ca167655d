"""The driver: one control flow over the worker groups, as in section 3 of the method.

    for each step:
        samples = rollout.generate(prompts)          # the student, on-policy (vLLM)
        teacher = teacher.score(samples)             # the steered teacher, at the safety ids only
        stats   = learners.train_step(samples, teacher)   # localized reverse KL, DeepSpeed ZeRO
        rollout.load_weights(learners.export())      # the next rollout sees the new policy
        every N steps: checkpoint

With ``trainer.max_staleness=1`` the next batch is generated while the current one trains (the
worker's weights then lag by at most one step). Distributed details live in :class:`Workers`.

Failures: a rollout worker or teacher that dies is recreated in its placement-group bundle, brought
to the current weights, and its share of the step is redone (every sample has its own seed, so the
redo draws the same tokens). A learner rank that dies takes the group down: the group is recreated
and restored from the newest checkpoint, at most ``trainer.max_restarts`` times. A step whose loss
or gradient is not finite is skipped; ``trainer.max_bad_steps`` of them in a row stop the run.
``SAFESTEER_FAULT=role:index:step[,...]`` injects such faults, for tests: the process of actor
``index`` of ``role`` (rollout, teacher, learner) is SIGKILLed from the driver while it works on that
step; ``nan`` makes learner rank ``index``'s loss NaN; ``driver`` SIGKILLs the driver itself while the
learners work on that step (then ``trainer.resume=auto`` continues the run).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from safesteer import checkpoint
from safesteer.actors import Role, free_port, placement, spawn
from safesteer.config import sequences_per_step
from safesteer.core.batch import collate, split, to_sequence_positions
from safesteer.errors import SafeSteerError
from safesteer.learner import LearnerWorker
from safesteer.models import compute_dtype
from safesteer.paths import atomic_write_text
from safesteer.rollout import RolloutWorker
from safesteer.teacher import OUTPUT_FOR_LOSS, TeacherWorker

log = logging.getLogger(__name__)


def roles(cfg) -> list[Role]:
    def env(group):
        return {"threads": group.threads}

    return [
        Role(
            "rollout",
            cfg.rollout.num_workers,
            cfg.rollout.num_cpus,
            cfg.rollout.num_gpus * cfg.rollout.tensor_parallel_size,
            dict(cfg.rollout.resources),
            env(cfg.rollout),
        ),
        Role(
            "teacher",
            cfg.teacher.num_actors,
            cfg.teacher.num_cpus,
            cfg.teacher.num_gpus,
            dict(cfg.teacher.resources),
            env(cfg.teacher),
        ),
        Role(
            "learner",
            cfg.learner.world_size,
            cfg.learner.num_cpus,
            cfg.learner.num_gpus,
            dict(cfg.learner.resources),
            env(cfg.learner),
        ),
    ]


@dataclass
class Step:
    prompts: list[int]  # indices into the training set, then (>= n_train) into the anchor set


def schedule(n_prompts: int, cfg, n_anchors: int = 0, pairs: dict[int, int] | None = None) -> list[Step]:
    """Seeded shuffle per epoch; full steps of ``prompts_per_step`` (a remainder is dropped).

    With anchors, each step also takes ``trainer.anchors_per_step`` anchor prompts (indices offset by
    ``n_prompts``), cycling through a seeded order of the anchor set. With ``pairs`` (training index
    -> anchor index), a step's anchors are first the pairs of its training prompts (the benign
    question of the same form beside each harmful one), then the cycle.
    """
    steps = []
    per = cfg.trainer.prompts_per_step
    for epoch in range(cfg.trainer.epochs):
        order = list(range(n_prompts))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        steps += [Step(order[i : i + per]) for i in range(0, n_prompts - per + 1, per)]
    if cfg.trainer.max_steps is not None:
        steps = steps[: cfg.trainer.max_steps]
    if not steps:
        raise SafeSteerError(
            f"trainer.prompts_per_step={per}: larger than the {n_prompts} usable training prompts, no step to run"
        )
    a = cfg.trainer.anchors_per_step if n_anchors else 0
    if a:
        order = list(range(n_anchors))
        random.Random(f"anchors:{cfg.seed}").shuffle(order)
        cursor = 0
        for st in steps:
            chosen = [pairs[p] for p in st.prompts if pairs and p in pairs][:a]
            while len(chosen) < a:
                j = order[cursor % n_anchors]
                cursor += 1
                if j not in chosen or n_anchors < a:
                    chosen.append(j)
            st.prompts = st.prompts + [n_prompts + j for j in chosen]
    return steps


def gate_rates(gate: list[bool] | None, harmful: list[bool]) -> dict:
    """With a harm-gated teacher: the fraction of training and of anchor sequences it steered."""
    if gate is None:
        return {}
    out = {}
    for key, want in (("gate_steered_train", True), ("gate_steered_anchor", False)):
        xs = [g for g, h in zip(gate, harmful) if h == want]
        out[key] = sum(xs) / len(xs) if xs else None
    return out


def rendezvous(pg, bundle_index: int) -> tuple[str, int]:
    """Address and a free port on the node of learner rank 0 (its placement-group bundle)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index)
    return ray.get(where.options(scheduling_strategy=strategy).remote())


def sample_seeds(seed: int, step: int, prompts: list[int], k: int) -> list[list[int]]:
    """One sampling seed per (step, training prompt, sample): what a sample is never depends on which
    worker drew it, in which batch, or whether the run was interrupted."""
    return [[random.Random(f"{seed}:{step}:{p}:{j}").getrandbits(31) for j in range(k)] for p in prompts]


FAULT_ENV = "SAFESTEER_FAULT"
FAULT_ROLES = ("rollout", "teacher", "learner", "nan", "driver")


@dataclass
class Faults:
    """Injected faults, from ``$SAFESTEER_FAULT`` (``role:index:step``, comma-separated); each fires once."""

    pending: list[tuple[str, int, int]] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(FAULT_ENV, "").strip()
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


class LearnerFailure(RuntimeError):
    """A learner rank died; the DeepSpeed group must be recreated."""


def _actor_died(e: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(e, RayActorError)


class Workers:
    """Handles of every actor, called like functions by the driver loop; replaces actors that die."""

    def __init__(
        self,
        cfg,
        model_path: str,
        vector_blob: bytes | None,
        safety_ids: list[int] | None,
        total_steps: int,
        device: str,
    ):
        import ray

        self._ray = ray
        self.cfg = cfg
        rs = roles(cfg)
        self.pg, self.index = placement(rs, cfg.cluster.strategy, cfg.cluster.placement_timeout_s)
        self.by = {r.name: r for r in rs}
        self.output = OUTPUT_FOR_LOSS[cfg.learner.loss]
        # the engines' dtype, also the dtype the learners' weights are sent in
        self.dtype = compute_dtype(cfg.model.dtype, device)
        self._rollout_args = (model_path, {**dict(cfg.rollout), "dtype": self.dtype})
        self._teacher_args = (
            model_path,
            dict(cfg.teacher),
            cfg.teacher.kind,
            vector_blob,
            cfg.teacher.system_prompt,
            safety_ids,
            self.output,
            cfg.learner.topk,
            "float32",
            cfg.model.trust_remote_code,
        )
        self._learner_args = (model_path, total_steps, safety_ids)
        self.device = device
        self.nccl = cfg.rollout.weight_sync == "nccl"
        if self.nccl and device != "cuda":
            raise SafeSteerError("rollout.weight_sync=nccl needs CUDA GPUs; use object_store on CPU")
        self.rollout = [self._spawn_rollout(i) for i in range(len(self.index["rollout"]))]
        self.teachers = [self._spawn_teacher(j) for j in range(len(self.index["teacher"]))]
        self.learners = self._spawn_learners()
        self.weights = None  # (object ref of the last synced safetensors blob, version)
        self.recovered = 0  # actors replaced during the current step

    # -- actors -------------------------------------------------------------------------------------

    def _spawn_rollout(self, i: int):
        path, rcfg = self._rollout_args
        b = self.index["rollout"][i]
        return spawn(
            RolloutWorker, self.pg, b, self.by["rollout"], path, rcfg, self.cfg.seed + i, self.device,
            self.cfg.model.trust_remote_code,
        )  # fmt: skip

    def _spawn_teacher(self, j: int):
        return spawn(
            TeacherWorker, self.pg, self.index["teacher"][j], self.by["teacher"], *self._teacher_args
        )

    def _spawn_learners(self) -> list:
        cfg, ray = self.cfg, self._ray
        path, total_steps, safety_ids = self._learner_args
        master_addr, port = rendezvous(self.pg, self.index["learner"][0])
        seqs = sequences_per_step(cfg)
        learners = [
            spawn(
                LearnerWorker,
                self.pg,
                b,
                self.by["learner"],
                rank,
                path,
                dict(cfg.learner),
                master_addr,
                port,
                total_steps,
                seqs,
                safety_ids,
                cfg.seed,
                cfg.model.trust_remote_code,
            )  # fmt: skip
            for rank, b in enumerate(self.index["learner"])
        ]
        if self.nccl:
            addr, wport = rendezvous(self.pg, self.index["learner"][0])
            tp = cfg.rollout.tensor_parallel_size
            ray.get([w.init_weight_transfer.remote(self.rollout, addr, wport, tp) for w in learners])
        return learners

    def wait_ready(self) -> None:
        ray = self._ray
        ray.get([w.info.remote() for w in self.rollout] + [t.pid.remote() for t in self.teachers])
        self._learners_get([w.pid.remote() for w in self.learners])

    def kill(self, role: str, index: int) -> None:
        """Fault injection: SIGKILL the actor's process (``ray.kill`` when it may be on another host)."""
        actor = {"rollout": self.rollout, "teacher": self.teachers, "learner": self.learners}[role][index]
        pid = self._ray.get(actor.pid.remote())
        if self.cfg.cluster.address is None:  # embedded Ray: every actor runs on this host
            os.kill(pid, signal.SIGKILL)
        else:
            self._ray.kill(actor, no_restart=True)

    def replace_rollout(self, i: int) -> dict | None:
        """A new rollout worker in bundle ``i`` at the last synced weights; returns its load result."""
        if self.nccl:
            raise SafeSteerError(
                f"rollout worker {i} died; replacing one is supported with rollout.weight_sync=object_store only"
            )
        log.warning("rollout worker %d died; starting a new one at policy version %s", i, self._version())
        self._ray.kill(self.rollout[i])
        self.rollout[i] = w = self._spawn_rollout(i)
        self.recovered += 1
        if self.weights is None:
            return None
        ref, version = self.weights
        return self._ray.get(w.load_weights.remote(ref, version))

    def replace_teacher(self, j: int) -> None:
        log.warning("teacher %d died; starting a new one", j)
        self._ray.kill(self.teachers[j])
        self.teachers[j] = self._spawn_teacher(j)
        self.recovered += 1

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
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except Exception as e:
                if _actor_died(e):
                    raise LearnerFailure(str(e).splitlines()[0]) from None
                raise
        return ray.get(futures)

    def _version(self) -> int:
        return self.weights[1] if self.weights is not None else 0

    # -- the stages ---------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], seeds: list[list[int]], kill: int | None = None):
        """Split prompts over the rollout workers; returns pending shards."""
        r, nw = self.cfg.rollout, len(self.rollout)
        shards = [(i, prompt_ids[i::nw], seeds[i::nw]) for i in range(nw)]
        pending = [
            (self.rollout[i].generate.remote(p, r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens, s), i, p, s)
            for i, p, s in shards
            if p
        ]  # fmt: skip
        if kill is not None:
            self.kill("rollout", kill)
        return pending, len(prompt_ids)

    def collect(self, pending, n_prompts: int) -> dict:
        """Gather rollout results back into prompt order (samples grouped by prompt); redo lost shards."""
        r = self.cfg.rollout
        out = [None] * n_prompts
        secs, toks, versions = [], 0, []
        nw = len(self.rollout)
        for fut, i, prompts, seeds in pending:
            try:
                res = self._ray.get(fut)
            except Exception as e:
                if not _actor_died(e):
                    raise
                self.replace_rollout(i)
                w = self.rollout[i]
                res = self._ray.get(
                    w.generate.remote(
                        prompts, r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens, seeds
                    )
                )
            per_prompt: dict[int, list] = {}
            for s in res["samples"]:
                per_prompt.setdefault(s["prompt_index"], []).append(s)
            for local, samples in per_prompt.items():
                out[local * nw + i] = samples
            secs.append(res["seconds"])
            toks += res["tokens"]
            versions.append(res["version"])
        return {"samples": out, "seconds": max(secs), "tokens": toks, "version": min(versions)}

    def score(
        self,
        instructions: list[str],
        completions: list[list[int]],
        steer: list[bool],
        kill: int | None = None,
    ) -> dict:
        n = len(self.teachers)
        shards = [(j, instructions[j::n], completions[j::n], steer[j::n]) for j in range(n)]
        futs = [
            (j, t.score.remote(ins, comp, st), ins, comp, st)
            for (j, ins, comp, st), t in zip(shards, self.teachers)
            if ins
        ]
        if kill is not None:
            self.kill("teacher", kill)
        res = []
        for j, fut, ins, comp, st in futs:
            try:
                res.append(self._ray.get(fut))
            except Exception as e:
                if not _actor_died(e):
                    raise
                self.replace_teacher(j)
                res.append(self._ray.get(self.teachers[j].score.remote(ins, comp, st)))
        B = len(instructions)
        merged = {}
        for key in res[0]["teacher"]:
            C = max(r["teacher"][key].shape[1] for r in res)
            shape = res[0]["teacher"][key].shape
            full = torch.zeros((B, C, *shape[2:]), dtype=res[0]["teacher"][key].dtype)
            for i, r in enumerate(res):
                v = r["teacher"][key]
                full[i::n, : v.shape[1]] = v
            merged[key] = full
        gate = None
        if res[0].get("gate") is not None:  # the harm probe's verdicts, back in batch order
            gate = [False] * B
            for i, r in enumerate(res):
                gate[i::n] = r["gate"]
        return {
            "teacher": merged,
            "gate": gate,
            "seconds": max(r["seconds"] for r in res),
            "tokens": sum(r["tokens"] for r in res),
        }

    def train_step(
        self, batch: dict, poison: int | None = None, kill: int | None = None, kill_driver: bool = False
    ) -> dict:
        shards = split(batch, len(self.learners))
        futs = [
            w.train_step.remote(s, rank == poison) for rank, (w, s) in enumerate(zip(self.learners, shards))
        ]
        if kill is not None:
            self.kill("learner", kill)
        if kill_driver:
            os.kill(os.getpid(), signal.SIGKILL)
        res = self._learners_get(futs)
        n = len(res)
        anchors = sum(r["anchor_sequences"] for r in res)
        return {
            "loss": sum(r["loss"] for r in res) / n,
            "anchor_loss": sum(r["anchor_loss_sum"] for r in res) / anchors if anchors else None,
            "safety_mass": sum(r["safety_mass"] for r in res) / n,
            "grad_norm": res[0]["grad_norm"],
            "lr": res[0]["lr"],
            "tokens": sum(r["tokens"] for r in res),
            "seconds": max(r["seconds"] for r in res),
            "skipped": any(r["skipped"] for r in res),
        }

    def load_rollout_weights(self, blob: bytes) -> None:
        """Put ``blob`` (safetensors) into every rollout engine, e.g. the selected step's weights."""
        ref = self._ray.put(blob)
        self._ray.get([w.load_weights.remote(ref, -1) for w in self.rollout])

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers from rollout worker 0 (at the last synced weights)."""
        return self._ray.get(self.rollout[0].greedy.remote(prompt_ids, max_new_tokens))

    def export(self, dtype: str = "bfloat16") -> bytes:
        blobs = self._learners_get([w.export_weights.remote(dtype) for w in self.learners])
        return blobs[0]

    def sync(self, version: int) -> dict:
        """Learners' weights -> every rollout worker: safetensors bytes put once in the object store
        (default), or an NCCL broadcast (``rollout.weight_sync=nccl``)."""
        t = time.perf_counter()
        if self.nccl:
            self._learners_get([w.send_weights.remote() for w in self.learners])
            self._ray.get([w.set_version.remote(version) for w in self.rollout])
            return {"seconds": time.perf_counter() - t, "sha256": [None] * len(self.rollout), "bytes": 0}
        blob = self.export(self.dtype)
        t_export = time.perf_counter() - t
        ref = self._ray.put(blob)
        self.weights = (ref, version)
        res = []
        for i in range(len(self.rollout)):
            try:
                res.append(self._ray.get(self.rollout[i].load_weights.remote(ref, version)))
            except Exception as e:
                if not _actor_died(e):
                    raise
                res.append(self.replace_rollout(i))  # loads self.weights, set above
        return {
            "seconds": time.perf_counter() - t,
            "export_seconds": t_export,
            "load_seconds": max(r["seconds"] for r in res),
            "sha256": [r["sha256"] for r in res],
            "bytes": len(blob),
        }

    def save_checkpoint(self, directory: Path) -> None:
        self._learners_get([w.save_state.remote(str(directory)) for w in self.learners])

    def load_checkpoint(self, directory: Path) -> None:
        self._learners_get([w.load_state.remote(str(directory)) for w in self.learners])

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.rollout + self.teachers + self.learners:
            self._ray.kill(a)
        remove_placement_group(self.pg)


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (``logger.tensorboard``)."""

    def __init__(self, run_dir: Path, cfg):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if cfg.logger.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def rewrite(self, rows: list[dict]) -> None:
        """Start over from ``rows`` (a resumed or restored run): no duplicate or missing steps."""
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()


def distill(
    cfg,
    workers: Workers,
    tok,
    instructions: list[str],
    prompt_ids: list[list[int]],
    run_dir: Path,
    keep_files: list[Path | None] = (),
    resume: checkpoint.Checkpoint | None = None,
    extra_state: dict | None = None,
    anchors: tuple[list[str], list[list[int]]] = ([], []),
    pairs: dict[int, int] | None = None,
    selector=None,
) -> list[dict]:
    """The SafeSteer training loop. Returns the per-step metrics (also written to metrics.jsonl).

    ``anchors`` (instructions, ids) are harmless prompts mixed into every step and scored by the
    original model (conditional steering: the teacher steers the training prompts only).
    ``resume`` continues from a checkpoint; ``keep_files`` (steering vector, safety tokens) and
    ``extra_state`` are stored in every checkpoint so that a resumed run needs nothing else.
    ``selector`` (:class:`safesteer.select.Selector`) validates every few steps and keeps the best weights.
    """
    t = cfg.trainer
    n_train = len(instructions)
    plan = [s.prompts for s in schedule(n_train, cfg, len(anchors[0]), pairs)]
    instructions, prompt_ids = instructions + list(anchors[0]), prompt_ids + list(anchors[1])
    total, k = len(plan), cfg.rollout.samples_per_prompt
    logger = MetricsLog(run_dir, cfg)
    root = run_dir / "checkpoints"
    checkpoint.clean_partial(root)
    faults = Faults.from_env()

    def restore(ck: checkpoint.Checkpoint | None) -> tuple[int, list[dict]]:
        """Learners (and then rollout workers) at checkpoint ``ck``'s state, or at the start."""
        if ck is not None:
            if ck.state.get("schedule") != plan:
                raise SafeSteerError(
                    f"{ck.path}: written for a different data order (training data, seed, prompts_per_step, "
                    "epochs or max_steps changed); resume with the run's own settings"
                )
            workers.load_checkpoint(ck.path)
        n = ck.step if ck is not None else 0
        workers.sync(version=n)
        rows = list(ck.state["history"]) if ck is not None else []
        logger.rewrite(rows)
        return n, rows

    def save(n: int, rows: list[dict]) -> None:
        state = {
            **(extra_state or {}),
            "schedule": plan,
            "history": rows,
            "seed": cfg.seed,
            "files": {"vector": None, "tokens": None},
        }
        for key, f in zip(("vector", "tokens"), keep_files):
            state["files"][key] = Path(f).name if f is not None else None
        path = checkpoint.save(root, n, workers.save_checkpoint, state, list(keep_files), t.keep_checkpoints)
        log.info("checkpoint: %s", path)

    def launch(i: int):
        ids = [prompt_ids[j] for j in plan[i]]
        return workers.generate(ids, sample_seeds(cfg.seed, i, plan[i], k), faults.take("rollout", i + 1))

    if resume is not None:
        if selector is not None:
            selector.restore()
        n, history = restore(resume)
        log.info("resumed from %s: step %d of %d", resume.path, n, total)
    else:
        n, history = 0, []
        logger.rewrite([])
    restarts = bad = 0
    pending = None
    bar = tqdm(total=total, initial=n, desc="distill", unit="step")
    try:
        while n < total:
            try:
                workers.recovered = 0
                t0 = time.perf_counter()
                if pending is None:
                    pending = launch(n)
                ro = workers.collect(*pending)  # samples from the student
                pending = None
                t_ro = time.perf_counter() - t0
                if t.max_staleness == 1 and n + 1 < total:
                    pending = launch(n + 1)  # overlaps with scoring and training below
                ins = [instructions[i] for i in plan[n] for _ in range(k)]
                p_ids = [prompt_ids[i] for i in plan[n] for _ in range(k)]
                steer = [i < n_train for i in plan[n] for _ in range(k)]  # labels: training prompts
                comps = [s["completion_ids"] for samples in ro["samples"] for s in samples]
                t1 = time.perf_counter()
                # the steered teacher (the original model on anchor prompts)
                sc = workers.score(ins, comps, steer, kill=faults.take("teacher", n + 1))
                t_sc = time.perf_counter() - t1
                batch = collate(p_ids, comps, tok.pad_token_id)
                batch["anchor"] = torch.tensor([0.0 if x else 1.0 for x in steer])
                batch["weight"] = torch.tensor([1.0 if x else t.anchor_weight for x in steer])
                L = batch["input_ids"].shape[1]
                teacher = sc["teacher"]
                batch["teacher_logprobs"] = to_sequence_positions(
                    teacher["logprobs"], batch["prompt_lens"], batch["completion_lens"], L
                )
                if "ids" in teacher:
                    batch["teacher_ids"] = to_sequence_positions(
                        teacher["ids"], batch["prompt_lens"], batch["completion_lens"], L
                    )
                t2 = time.perf_counter()
                stats = workers.train_step(  # localized reverse KL
                    batch,
                    poison=faults.take("nan", n + 1),
                    kill=faults.take("learner", n + 1),
                    kill_driver=faults.take("driver", n + 1) is not None,
                )
                t_lr = time.perf_counter() - t2
                sync = workers.sync(version=n + 1)  # the next rollout sees the new policy
            except LearnerFailure as e:
                restarts += 1
                last = checkpoint.latest(root)
                if restarts > t.max_restarts:
                    raise SafeSteerError(
                        f"a learner rank died {restarts} times (last at step {n + 1}: {e}); stopping after "
                        f"trainer.max_restarts={t.max_restarts}. Newest checkpoint: "
                        f"{last.path if last else 'none'} (resume with trainer.resume=auto)"
                    ) from None
                log.warning(
                    "a learner rank died at step %d (%s); restarting the learner group from %s (%d/%d)",
                    n + 1, e, last.path if last else "the initial weights", restarts, t.max_restarts,
                )  # fmt: skip
                pending = None
                workers.restart_learners()
                n, history = restore(last)
                bar.n = n
                bar.refresh()
                continue
            wall = time.perf_counter() - t0
            busy = ro["seconds"] + sc["seconds"] + stats["seconds"] + sync["seconds"]
            row = {
                "step": n + 1,
                "loss": stats["loss"],
                "anchor_loss": stats["anchor_loss"],
                "safety_mass": stats["safety_mass"],
                "grad_norm": stats["grad_norm"],
                "lr": stats["lr"],
                "skipped": stats["skipped"],
                "recovered": workers.recovered,
                "restarts": restarts,
                "policy_lag": n - ro["version"],
                **gate_rates(sc["gate"], steer),
                "completion_tokens": ro["tokens"],
                "mean_completion_len": ro["tokens"] / max(len(comps), 1),
                "rollout_s": ro["seconds"],
                "teacher_s": sc["seconds"],
                "learner_s": stats["seconds"],
                "sync_s": sync["seconds"],
                "rollout_wait_s": t_ro,
                "teacher_wait_s": t_sc,
                "learner_wait_s": t_lr,
                "step_s": wall,
                "idle_s": max(0.0, wall - busy)
                if t.max_staleness == 0
                else max(0.0, wall - (busy - ro["seconds"])),
                "rollout_tokens_per_s": ro["tokens"] / max(ro["seconds"], 1e-9),
                "teacher_tokens_per_s": sc["tokens"] / max(sc["seconds"], 1e-9),
                "learner_tokens_per_s": stats["tokens"] / max(stats["seconds"], 1e-9),
                "weights_sha256": sync["sha256"][0],
            }
            if selector is not None and not stats["skipped"] and selector.due(n + 1, total):
                decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
                row.update(
                    selector.validate(n + 1, workers.greedy, decode, lambda: workers.export("float32"))
                )
            logger.write(row)
            history.append(row)
            n += 1
            bar.set_postfix(loss=f"{row['loss']:.4f}", mass=f"{row['safety_mass']:.3f}")
            bar.update(1)
            if stats["skipped"]:
                bad += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", n, bad)
                if bad >= t.max_bad_steps:
                    last = checkpoint.latest(root)
                    raise SafeSteerError(
                        f"{bad} consecutive steps with a non-finite loss or gradient (steps {n - bad + 1}-{n}); "
                        f"stopping (trainer.max_bad_steps={t.max_bad_steps}). Last good checkpoint: "
                        f"{last.path if last else 'none written yet'}"
                    )
                continue
            bad = 0
            if t.checkpoint_every and (n % t.checkpoint_every == 0 or n == total):
                save(n, history)
    finally:
        bar.close()
    return history
