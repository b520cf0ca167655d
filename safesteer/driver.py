"""The driver: one control flow over the worker groups, as in section 3 of the method.

    for each step:
        samples = rollout.generate(prompts)          # the student, on-policy (vLLM)
        teacher = teacher.score(samples)             # the steered teacher, at the safety ids only
        stats   = learners.train_step(samples, teacher)   # localized reverse KL, DeepSpeed ZeRO
        rollout.load_weights(learners.export())      # the next rollout sees the new policy

With ``trainer.max_staleness=1`` the next batch is generated while the current one trains (the
worker's weights then lag by at most one step). Distributed details live in :class:`Workers`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from safesteer.actors import Role, free_port, placement, spawn
from safesteer.core.batch import collate, split, to_sequence_positions
from safesteer.errors import SafeSteerError
from safesteer.learner import LearnerWorker
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
    prompts: list[int]  # indices into the training set


def schedule(n_prompts: int, cfg) -> list[Step]:
    """Seeded shuffle per epoch; full steps of ``prompts_per_step`` (a remainder is dropped)."""
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
    return steps


def rendezvous(pg, bundle_index: int) -> tuple[str, int]:
    """Address and a free port on the node of learner rank 0 (its placement-group bundle)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index)
    return ray.get(where.options(scheduling_strategy=strategy).remote())


class Workers:
    """Handles of every actor, called like functions by the driver loop."""

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

        self.cfg = cfg
        rs = roles(cfg)
        self.pg, index = placement(rs, cfg.cluster.strategy, cfg.cluster.placement_timeout_s)
        by = {r.name: r for r in rs}
        rollout_cfg = {**dict(cfg.rollout), "dtype": cfg.model.dtype}
        trc = cfg.model.trust_remote_code
        self.rollout = [
            spawn(
                RolloutWorker, self.pg, b, by["rollout"], model_path, rollout_cfg, cfg.seed + i, device, trc
            )
            for i, b in enumerate(index["rollout"])
        ]
        self.output = OUTPUT_FOR_LOSS[cfg.learner.loss]
        teacher_dtype = "float32"
        self.teachers = [
            spawn(
                TeacherWorker,
                self.pg,
                b,
                by["teacher"],
                model_path,
                dict(cfg.teacher),
                cfg.teacher.kind,
                vector_blob,
                cfg.teacher.system_prompt,
                safety_ids,
                self.output,
                cfg.learner.topk,
                teacher_dtype,
                trc,
            )
            for b in index["teacher"]
        ]
        master_addr, port = rendezvous(self.pg, index["learner"][0])
        seqs = cfg.trainer.prompts_per_step * cfg.rollout.samples_per_prompt
        self.learners = [
            spawn(
                LearnerWorker,
                self.pg,
                b,
                by["learner"],
                rank,
                model_path,
                dict(cfg.learner),
                master_addr,
                port,
                total_steps,
                seqs,
                safety_ids,
                cfg.seed,
                trc,
            )
            for rank, b in enumerate(index["learner"])
        ]
        self._ray = ray
        self.nccl = cfg.rollout.weight_sync == "nccl"
        if self.nccl:
            if device != "cuda":
                raise SafeSteerError("rollout.weight_sync=nccl needs CUDA GPUs; use object_store on CPU")
            addr, wport = rendezvous(self.pg, index["learner"][0])
            tp = cfg.rollout.tensor_parallel_size
            ray.get([w.init_weight_transfer.remote(self.rollout, addr, wport, tp) for w in self.learners])

    def wait_ready(self) -> None:
        ray = self._ray
        ray.get([w.info.remote() for w in self.rollout] + [t.pid.remote() for t in self.teachers])

    def generate(self, prompt_ids: list[list[int]]):
        """Split prompts over the rollout workers; returns futures."""
        r = self.cfg.rollout
        shards = [prompt_ids[i :: len(self.rollout)] for i in range(len(self.rollout))]
        return [
            (w.generate.remote(s, r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens), i)
            for i, (w, s) in enumerate(zip(self.rollout, shards))
            if s
        ]

    def collect(self, futures, n_prompts: int) -> dict:
        """Gather rollout results back into prompt order: samples grouped by prompt."""
        out = [None] * n_prompts
        secs, toks, versions = [], 0, []
        nw = len(self.rollout)
        for fut, i in futures:
            res = self._ray.get(fut)
            per_prompt: dict[int, list] = {}
            for s in res["samples"]:
                per_prompt.setdefault(s["prompt_index"], []).append(s)
            for local, samples in per_prompt.items():
                out[local * nw + i] = samples
            secs.append(res["seconds"])
            toks += res["tokens"]
            versions.append(res["version"])
        return {"samples": out, "seconds": max(secs), "tokens": toks, "version": min(versions)}

    def score(self, instructions: list[str], completions: list[list[int]]) -> dict:
        n = len(self.teachers)
        shards = [(instructions[i::n], completions[i::n]) for i in range(n)]
        futs = [t.score.remote(ins, comp) for t, (ins, comp) in zip(self.teachers, shards) if ins]
        res = self._ray.get(futs)
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
        return {
            "teacher": merged,
            "seconds": max(r["seconds"] for r in res),
            "tokens": sum(r["tokens"] for r in res),
        }

    def train_step(self, batch: dict) -> dict:
        shards = split(batch, len(self.learners))
        res = self._ray.get([w.train_step.remote(s) for w, s in zip(self.learners, shards)])
        n = len(res)
        return {
            "loss": sum(r["loss"] for r in res) / n,
            "safety_mass": sum(r["safety_mass"] for r in res) / n,
            "grad_norm": res[0]["grad_norm"],
            "lr": res[0]["lr"],
            "tokens": sum(r["tokens"] for r in res),
            "seconds": max(r["seconds"] for r in res),
        }

    def export(self, dtype: str = "bfloat16") -> bytes:
        blobs = self._ray.get([w.export_weights.remote(dtype) for w in self.learners])
        return blobs[0]

    def sync(self, version: int) -> dict:
        """Learners' weights -> every rollout worker: safetensors bytes put once in the object store
        (default), or an NCCL broadcast (``rollout.weight_sync=nccl``)."""
        t = time.perf_counter()
        if self.nccl:
            self._ray.get([w.send_weights.remote() for w in self.learners])
            self._ray.get([w.set_version.remote(version) for w in self.rollout])
            return {"seconds": time.perf_counter() - t, "sha256": [None] * len(self.rollout), "bytes": 0}
        blob = self.export(self.cfg.model.dtype)
        t_export = time.perf_counter() - t
        ref = self._ray.put(blob)
        res = self._ray.get([w.load_weights.remote(ref, version) for w in self.rollout])
        return {
            "seconds": time.perf_counter() - t,
            "export_seconds": t_export,
            "load_seconds": max(r["seconds"] for r in res),
            "sha256": [r["sha256"] for r in res],
            "bytes": len(blob),
        }

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
    cfg, workers: Workers, tok, instructions: list[str], prompt_ids: list[list[int]], run_dir: Path
) -> list[dict]:
    """The SafeSteer training loop. Returns the per-step metrics (also written to metrics.jsonl)."""
    steps = schedule(len(instructions), cfg)
    logger = MetricsLog(run_dir, cfg)
    k = cfg.rollout.samples_per_prompt
    history = []

    def launch(step: Step):
        return workers.generate([prompt_ids[i] for i in step.prompts]), len(step.prompts)

    pending = launch(steps[0])
    bar = tqdm(total=len(steps), desc="distill", unit="step")
    for n, step in enumerate(steps):
        t0 = time.perf_counter()
        ro = workers.collect(*pending)  # samples from the student
        t_ro = time.perf_counter() - t0
        if cfg.trainer.max_staleness == 1 and n + 1 < len(steps):
            pending = launch(steps[n + 1])  # overlaps with scoring and training below
        ins = [instructions[i] for i in step.prompts for _ in range(k)]
        p_ids = [prompt_ids[i] for i in step.prompts for _ in range(k)]
        comps = [s["completion_ids"] for samples in ro["samples"] for s in samples]
        t1 = time.perf_counter()
        sc = workers.score(ins, comps)  # the steered teacher at the safety ids
        t_sc = time.perf_counter() - t1
        batch = collate(p_ids, comps, tok.pad_token_id)
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
        stats = workers.train_step(batch)  # localized reverse KL
        t_lr = time.perf_counter() - t2
        sync = workers.sync(version=n + 1)  # the next rollout sees the new policy
        if cfg.trainer.max_staleness == 0 and n + 1 < len(steps):
            pending = launch(steps[n + 1])
        wall = time.perf_counter() - t0
        busy = ro["seconds"] + sc["seconds"] + stats["seconds"] + sync["seconds"]
        row = {
            "step": n + 1,
            "loss": stats["loss"],
            "safety_mass": stats["safety_mass"],
            "grad_norm": stats["grad_norm"],
            "lr": stats["lr"],
            "policy_lag": n - ro["version"],
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
            if cfg.trainer.max_staleness == 0
            else max(0.0, wall - (busy - ro["seconds"])),
            "rollout_tokens_per_s": ro["tokens"] / max(ro["seconds"], 1e-9),
            "teacher_tokens_per_s": sc["tokens"] / max(sc["seconds"], 1e-9),
            "learner_tokens_per_s": stats["tokens"] / max(stats["seconds"], 1e-9),
            "weights_sha256": sync["sha256"][0],
        }
        logger.write(row)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", mass=f"{row['safety_mass']:.3f}")
        bar.update(1)
    bar.close()
    return history
