"""Learner ranks: Ray actors forming one DeepSpeed ZeRO-2/3 data-parallel group.

Each rank gets an equal shard of the step's sequences, splits it into micro-batches, computes the
localized reverse KL (:mod:`safesteer.core.loss`) under bf16 autocast, and DeepSpeed accumulates,
averages over ranks, clips and steps AdamW with a cosine schedule with warmup. gloo on CPU,
NCCL on GPU; the driver bootstraps the group (address, port, ranks).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from safesteer.actors import configure_threads
from safesteer.core.batch import split, trim
from safesteer.core.loss import localized_reverse_kl_terms, safety_mass, sequence_mean
from safesteer.core.scoring import right_padded_positions
from safesteer.errors import SafeSteerError
from safesteer.models import use_bf16

# Adam's per-partition state, saved next to the fp32 master partition (ZeRO keeps one of each per rank).
OPTIMIZER_STATE = ("step", "exp_avg", "exp_avg_sq")


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warmup over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def freeze_below(model, layer: int | None) -> list[str]:
    """Freeze the token embeddings (and a head tied to them) and the decoder blocks below ``layer``
    (None: nothing frozen), so that only what comes after, e.g. the steering layer, moves.
    Returns the names of the frozen parameters."""
    if layer is None:
        return []
    from safesteer.models import decoder_layers

    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise SafeSteerError(
            f"learner.train_from_layer={layer}: out of range for a {len(blocks)}-layer model"
        )
    frozen = {id(p) for p in model.get_input_embeddings().parameters()}
    for block in blocks[:layer]:
        frozen |= {id(p) for p in block.parameters()}
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            names.append(name)
    return names


def deepspeed_config(cfg: dict, sequences_per_step: int) -> dict:
    world, micro = cfg["world_size"], cfg["micro_batch_size"]
    zero = {"stage": cfg["zero_stage"]}
    if cfg["zero_stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": sequences_per_step,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": sequences_per_step // (world * micro),
        "gradient_clipping": cfg["grad_clip"],
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class LearnerWorker:
    """One DeepSpeed rank (wrapped by ``ray.remote`` in :mod:`safesteer.actors`)."""

    def __init__(
        self,
        rank: int,
        model_path: str,
        cfg: dict,
        master_addr: str,
        master_port: int,
        total_steps: int,
        sequences_per_step: int,
        safety_ids: list[int] | None,
        seed: int,
        trust_remote_code: bool = False,
    ):
        configure_threads(cfg["threads"])
        cuda = torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(cfg["world_size"]),
            LOCAL_RANK="0" if not cuda else os.environ.get("LOCAL_RANK", "0"),
            LOCAL_SIZE="1",
        )
        if not cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed
        import deepspeed.ops

        # avoid a ~2 min JIT build of the shared-memory allreduce op on CPU
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.rank, self.device = rank, "cuda" if cuda else "cpu"
        self.cfg = {**cfg, "bf16": use_bf16(cfg["bf16"], self.device)}
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        model.config.use_cache = False
        freeze_below(model, cfg.get("train_from_layer"))
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
            weight_decay=cfg["weight_decay"],
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total_steps, cfg["warmup_ratio"]))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, sequences_per_step)
        )
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.ids = torch.tensor(safety_ids, device=self.device) if safety_ids else None
        self.steps = 0

    def _micro_loss(self, mb: dict) -> tuple[torch.Tensor, dict]:
        mb = {k: v.to(self.device) for k, v in trim(mb).items()}
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.cfg["bf16"]):
            logits = self.engine(
                input_ids=mb["input_ids"],
                attention_mask=mb["attention_mask"],
                position_ids=right_padded_positions(mb["attention_mask"]),
            ).logits[:, :-1]
        mode = self.cfg["loss"]
        ids = mb.get("teacher_ids", self.ids)
        terms = localized_reverse_kl_terms(
            logits,
            mb["teacher_logprobs"],
            ids,
            mode,
            self.cfg["renormalize"],
            target_ids=mb["input_ids"][:, 1:],
        )
        per_seq = sequence_mean(terms, mb["completion_mask"])
        stats = {"loss_sum": per_seq.sum().item(), "sequences": per_seq.numel()}
        if "anchor" in mb:
            stats["anchor_loss_sum"] = (per_seq.detach() * mb["anchor"]).sum().item()
            stats["anchor_sequences"] = int(mb["anchor"].sum().item())
        if self.ids is not None:
            stats["mass_sum"] = safety_mass(logits, self.ids, mb["completion_mask"]).item() * per_seq.numel()
        # Anchor sequences weigh trainer.anchor_weight in the loss (training sequences 1).
        loss = (per_seq * mb["weight"]).mean() if "weight" in mb else per_seq.mean()
        return loss, stats

    def train_step(self, shard: dict, poison: bool = False) -> dict:
        """One optimizer step over this rank's shard (split into micro-batches).

        A non-finite loss or gradient on any rank makes DeepSpeed skip the update on every rank (the
        global gradient norm is not finite): the weights, Adam state and LR schedule stay as they were
        and ``skipped`` is True. ``poison`` turns this rank's loss into NaN (fault injection for tests).
        """
        t = time.perf_counter()
        self.engine.train()
        n_micro = shard["input_ids"].shape[0] // self.cfg["micro_batch_size"]
        if n_micro != self.engine.gradient_accumulation_steps():  # else DeepSpeed steps mid-shard
            raise ValueError(
                f"learner rank {self.rank}: shard of {shard['input_ids'].shape[0]} sequences is "
                f"{n_micro} micro-batches, but the engine was built for "
                f"{self.engine.gradient_accumulation_steps()} per optimizer step"
            )
        totals = {
            "loss_sum": 0.0,
            "sequences": 0,
            "mass_sum": 0.0,
            "anchor_loss_sum": 0.0,
            "anchor_sequences": 0,
        }
        skipped_before = self.engine.skipped_steps
        for mb in split(shard, n_micro):
            loss, stats = self._micro_loss(mb)
            if poison:
                loss = loss * float("nan")
                stats["loss_sum"] = float("nan")
            self.engine.backward(loss)
            self.engine.step()
            for k, v in stats.items():
                totals[k] += v
        skipped = self.engine.skipped_steps > skipped_before
        if not skipped:
            self.steps += 1
        grad_norm = self.engine.get_global_grad_norm()
        n = max(totals["sequences"], 1)
        return {
            "loss": totals["loss_sum"] / n,
            "anchor_loss_sum": totals["anchor_loss_sum"],
            "anchor_sequences": totals["anchor_sequences"],
            "safety_mass": totals["mass_sum"] / n if self.ids is not None else float("nan"),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": int(shard["completion_mask"].sum().item()),
            "seconds": time.perf_counter() - t,
            "step": self.steps,
            "skipped": skipped,
        }

    def pid(self) -> int:
        return os.getpid()

    def _partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions (one per parameter group)."""
        opt = self.engine.optimizer
        if self.cfg["zero_stage"] == 3:
            return list(opt.fp32_partitioned_groups_flat)
        return list(opt.single_partition_of_fp32_groups)

    def save_state(self, directory: str) -> str:
        """Write this rank's share of a checkpoint: ``learner-rank<r>.safetensors`` in ``directory``.

        It holds the rank's fp32 master partitions, their Adam state, the torch RNG state and (as
        metadata) the step counters and LR schedule: everything needed to continue bitwise-exactly
        with the same world size and ZeRO stage. No pickle anywhere.
        """
        from safetensors.torch import save_file

        base = self.engine.optimizer.optimizer
        tensors = {"rng.torch": torch.get_rng_state()}
        for i, flat in enumerate(self._partitions()):
            tensors[f"fp32.{i}"] = flat.detach().cpu()
            for key, value in base.state.get(flat, {}).items():
                if key in OPTIMIZER_STATE and torch.is_tensor(value):
                    tensors[f"{key}.{i}"] = value.detach().cpu()
        sched = self.scheduler
        meta = {
            "world_size": self.cfg["world_size"],
            "zero_stage": self.cfg["zero_stage"],
            "partitions": len(self._partitions()),
            "steps": self.steps,
            "global_steps": self.engine.global_steps,
            "global_samples": self.engine.global_samples,
            "skipped_steps": self.engine.skipped_steps,
            "scheduler": {"last_epoch": sched.last_epoch, "step_count": sched._step_count},
            "lr": [g["lr"] for g in sched.optimizer.param_groups],
        }
        path = Path(directory) / f"learner-rank{self.rank}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"safesteer": json.dumps(meta)},
        )
        os.replace(tmp, path)
        return str(path)

    def load_state(self, directory: str) -> int:
        """Restore what :meth:`save_state` wrote; returns the optimizer step it continues from."""
        from safetensors import safe_open

        path = Path(directory) / f"learner-rank{self.rank}.safetensors"
        if not path.is_file():
            raise SafeSteerError(
                f"{path}: missing; a checkpoint resumes only with the learner.world_size it was written with"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("safesteer", "null") or "null")
            if not isinstance(meta, dict):
                raise SafeSteerError(f"{path}: not a SafeSteer learner checkpoint (no metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        want = {"world_size": self.cfg["world_size"], "zero_stage": self.cfg["zero_stage"]}
        have = {k: meta.get(k) for k in want}
        if have != want or meta.get("partitions") != len(self._partitions()):
            raise SafeSteerError(
                f"{path}: written with {have}, this run has {want}; resume with the same learner settings"
            )
        base = self.engine.optimizer.optimizer
        for i, flat in enumerate(self._partitions()):
            saved = tensors[f"fp32.{i}"]
            if saved.shape != flat.shape:
                raise SafeSteerError(
                    f"{path}: partition {i} has shape {tuple(saved.shape)}, the model's is {tuple(flat.shape)}"
                )
            flat.data.copy_(saved)
            state = {k: tensors[f"{k}.{i}"].clone() for k in OPTIMIZER_STATE if f"{k}.{i}" in tensors}
            if state:
                base.state[flat] = state
        opt = self.engine.optimizer
        if self.cfg["zero_stage"] == 3:  # the working (partitioned) weights follow the fp32 masters
            for low, master in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
                low.data.copy_(master.data)
        else:
            opt.update_lp_params()
        torch.set_rng_state(tensors["rng.torch"])
        sched = self.scheduler
        sched.last_epoch, sched._step_count = meta["scheduler"]["last_epoch"], meta["scheduler"]["step_count"]
        for group, lr in zip(sched.optimizer.param_groups, meta["lr"]):
            group["lr"] = lr
        sched._last_lr = list(meta["lr"])
        self.engine.global_steps = meta["global_steps"]
        self.engine.global_samples = meta["global_samples"]
        self.engine.skipped_steps = meta["skipped_steps"]
        self.steps = meta["steps"]
        return self.steps

    def export_weights(self, dtype: str = "bfloat16") -> bytes | None:
        """Full weights as safetensors bytes on rank 0 (None elsewhere). Every rank must call it (ZeRO-3)."""
        from safetensors.torch import save

        dt = getattr(torch, dtype)
        module = self.engine.module
        state = {}
        if self.cfg["zero_stage"] == 3:
            import deepspeed

            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        state[name] = p.detach().to(dt).cpu().clone()
            for name, b in module.named_buffers():
                if self.rank == 0 and name in module.state_dict():
                    state[name] = b.detach().to(dt).cpu().clone()
        elif self.rank == 0:
            state = {k: v.detach().to(dt).cpu().clone() for k, v in module.state_dict().items()}
        if self.rank != 0:
            return None
        if self.tied:
            state.pop("lm_head.weight", None)
        return save(state)

    def init_weight_transfer(self, rollout_handles, master_addr: str, master_port: int, tp: int) -> None:
        """Join the NCCL weight-transfer group with the rollout engines (``rollout.weight_sync=nccl``)."""
        from safesteer.weight_sync import RolloutClient, trainer_engine, zero_source

        skip = ("lm_head.weight",) if self.tied else ()
        source = zero_source(self.engine.module, self.cfg["zero_stage"], torch.bfloat16, skip)
        client = RolloutClient(rollout_handles, tp)
        self.transfer = trainer_engine(
            self.rank, master_addr, master_port, len(rollout_handles), tp, client, source
        )

    def send_weights(self) -> float:
        """Broadcast the current weights to every rollout engine over NCCL; returns seconds."""
        t = time.perf_counter()
        self.transfer.send_weights()
        return time.perf_counter() - t
