"""Learner ranks: Ray actors forming one DeepSpeed ZeRO-2/3 data-parallel group.

Each rank gets an equal shard of the step's sequences, splits it into micro-batches, computes the
localized reverse KL (:mod:`safesteer.core.loss`) under bf16 autocast, and DeepSpeed accumulates,
averages over ranks, clips and steps AdamW with a cosine schedule with warmup. gloo on CPU,
NCCL on GPU; the driver bootstraps the group (address, port, ranks).
"""

from __future__ import annotations

import math
import os
import time

import torch

from safesteer.actors import configure_threads
from safesteer.core.batch import split, trim
from safesteer.core.loss import localized_reverse_kl_terms, safety_mass, sequence_mean
from safesteer.core.scoring import right_padded_positions


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warmup over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


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
        self.rank, self.cfg, self.device = rank, cfg, "cuda" if cuda else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        model.config.use_cache = False
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"]
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
        if self.ids is not None:
            stats["mass_sum"] = safety_mass(logits, self.ids, mb["completion_mask"]).item() * per_seq.numel()
        return per_seq.mean(), stats

    def train_step(self, shard: dict) -> dict:
        """One optimizer step over this rank's shard (split into micro-batches)."""
        t = time.perf_counter()
        self.engine.train()
        n_micro = shard["input_ids"].shape[0] // self.cfg["micro_batch_size"]
        totals = {"loss_sum": 0.0, "sequences": 0, "mass_sum": 0.0}
        for mb in split(shard, n_micro):
            loss, stats = self._micro_loss(mb)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in stats.items():
                totals[k] += v
        self.steps += 1
        grad_norm = self.engine.get_global_grad_norm()
        n = max(totals["sequences"], 1)
        return {
            "loss": totals["loss_sum"] / n,
            "safety_mass": totals["mass_sum"] / n if self.ids is not None else float("nan"),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": int(shard["completion_mask"].sum().item()),
            "seconds": time.perf_counter() - t,
            "step": self.steps,
        }

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
