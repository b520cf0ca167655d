"""A learner rank's checkpoint: its ZeRO partitions, Adam state, RNG and schedule, as safetensors.

One file per rank, ``learner-rank<r>.safetensors``: the rank's flat fp32 master partitions, their
Adam state, the torch RNG state and (as metadata) the step counters and LR schedule: everything
needed to continue bitwise-exactly with the same world size and ZeRO stage. No pickle anywhere.
These functions reach into DeepSpeed's ZeRO optimizer (stages 1-3) and nothing else does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safesteer.errors import SafeSteerError

OPTIMIZER_STATE = ("step", "exp_avg", "exp_avg_sq")


def partitions(engine, zero_stage: int) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions (one per parameter group)."""
    opt = engine.optimizer
    if zero_stage == 3:
        return list(opt.fp32_partitioned_groups_flat)
    return list(opt.single_partition_of_fp32_groups)


def save(engine, scheduler, rank: int, cfg, steps: int, directory: str) -> str:
    """Write rank ``rank``'s share of a checkpoint into ``directory`` (a temp name, then renamed)."""
    base = engine.optimizer.optimizer
    parts = partitions(engine, cfg.zero_stage)
    tensors = {"rng.torch": torch.get_rng_state()}
    for i, flat in enumerate(parts):
        tensors[f"fp32.{i}"] = flat.detach().cpu()
        for key, value in base.state.get(flat, {}).items():
            if key in OPTIMIZER_STATE and torch.is_tensor(value):
                tensors[f"{key}.{i}"] = value.detach().cpu()
    meta = {
        "world_size": cfg.world_size,
        "zero_stage": cfg.zero_stage,
        "partitions": len(parts),
        "steps": steps,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "scheduler": {"last_epoch": scheduler.last_epoch, "step_count": scheduler._step_count},
        "lr": [g["lr"] for g in scheduler.optimizer.param_groups],
    }
    path = Path(directory) / f"learner-rank{rank}.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"safesteer": json.dumps(meta)},
    )
    os.replace(tmp, path)
    return str(path)


def load(engine, scheduler, rank: int, cfg, directory: str) -> int:
    """Restore what :func:`save` wrote for rank ``rank``; returns the optimizer step it continues from."""
    path = Path(directory) / f"learner-rank{rank}.safetensors"
    if not path.is_file():
        raise SafeSteerError(
            f"{path}: missing; a checkpoint resumes only with the learner.world_size it was written with"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("safesteer", "null") or "null")
        if not isinstance(meta, dict):
            raise SafeSteerError(f"{path}: not a SafeSteer learner checkpoint (no metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    parts = partitions(engine, cfg.zero_stage)
    want = {"world_size": cfg.world_size, "zero_stage": cfg.zero_stage}
    have = {k: meta.get(k) for k in want}
    if have != want or meta.get("partitions") != len(parts):
        raise SafeSteerError(
            f"{path}: written with {have}, this run has {want}; resume with the same learner settings"
        )
    base = engine.optimizer.optimizer
    for i, flat in enumerate(parts):
        saved = tensors[f"fp32.{i}"]
        if saved.shape != flat.shape:
            raise SafeSteerError(
                f"{path}: partition {i} has shape {tuple(saved.shape)}, the model's is {tuple(flat.shape)}"
            )
        flat.data.copy_(saved)
        state = {k: tensors[f"{k}.{i}"].clone() for k in OPTIMIZER_STATE if f"{k}.{i}" in tensors}
        if state:
            base.state[flat] = state
    opt = engine.optimizer
    if cfg.zero_stage == 3:  # the working (partitioned) weights follow the fp32 masters
        for low, master in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
            low.data.copy_(master.data)
    else:
        opt.update_lp_params()
    torch.set_rng_state(tensors["rng.torch"])
    scheduler.last_epoch, scheduler._step_count = (
        meta["scheduler"]["last_epoch"],
        meta["scheduler"]["step_count"],
    )
    for group, lr in zip(scheduler.optimizer.param_groups, meta["lr"]):
        group["lr"] = lr
    scheduler._last_lr = list(meta["lr"])
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.skipped_steps = meta["skipped_steps"]
    return meta["steps"]
