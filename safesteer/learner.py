"""Learner ranks: Ray actors forming one DeepSpeed ZeRO-2/3 data-parallel group.

Each rank gets an equal shard of the step's sequences, splits it into micro-batches, computes the
localized reverse KL (:mod:`safesteer.core.loss`) under bf16 autocast, and DeepSpeed accumulates,
averages over ranks, clips and steps AdamW with a cosine schedule with warmup. gloo on CPU,
NCCL on GPU; the driver bootstraps the group (address, port, ranks).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from safesteer import learner_state
from safesteer.cluster import Placement, configure_threads, release_freed_memory
from safesteer.core.batch import split
from safesteer.core.lora import factor_blob
from safesteer.core.loss import MODES, LocalizedStudent, micro_batch_loss
from safesteer.core.steering import decoder_layers
from safesteer.core.tokens import SafetyTokens
from safesteer.errors import SafeSteerError
from safesteer.models import ModelConfig, load_tokenizer, use_bf16
from safesteer.schema import group, option, require
from safesteer.teacher import LearnerTeacher
from safesteer.weight_sync import RolloutClient, trainer_engine, zero_source


@dataclass
class LoraSettings:
    """``learner.lora``: low-rank adapters instead of full fine-tuning (``r`` 0: off)."""

    r: int = option(ge=0)
    alpha: float = option(gt=0)
    dropout: float = option(fraction="[)")
    target_modules: list[str] = option(default=[])


@dataclass
class LearnerConfig(Placement):
    """``learner``: the DeepSpeed ZeRO learner group (conf/learner)."""

    world_size: int = option(ge=1)
    zero_stage: int = option(choices=(0, 1, 2, 3))
    loss: str = option(choices=MODES)
    renormalize: bool = option()
    lr: float = option(gt=0)
    train_from_layer: int | None = option(ge=0)
    weight_decay: float = option(ge=0)
    betas: list[float] = option(default=[])
    warmup_ratio: float = option(fraction="[)")
    grad_clip: float = option(gt=0)
    bf16: Any = option(choices=(True, False, "auto"))
    micro_batch_size: int = option(ge=1)
    logits_chunk: int = option(ge=1)
    lora: LoraSettings = group(LoraSettings)

    @staticmethod
    def rules(cfg) -> None:
        ln = cfg.learner
        why = "cannot be combined with learner.loss=bucket"
        require(not (ln.renormalize and ln.loss == "bucket"), "learner.renormalize", ln.renormalize, why)
        betas = list(ln.betas)
        ok = len(betas) == 2 and all(0 <= b < 1 for b in betas)
        require(ok, "learner.betas", betas, "must be two numbers in [0, 1)")
        if ln.lora.r:
            why = "LoRA adapters train under ZeRO stages 0-2 (learner.lora.r > 0)"
            require(ln.zero_stage <= 2, "learner.zero_stage", ln.zero_stage, why)
            why = "cannot be combined with learner.lora.r > 0 (the adapters are what trains)"
            require(ln.train_from_layer is None, "learner.train_from_layer", ln.train_from_layer, why)
            mods = list(ln.lora.target_modules)
            require(len(mods) > 0, "learner.lora.target_modules", mods, "needs at least one module name")


# Adam's per-partition state, saved next to the fp32 master partition (ZeRO keeps one of each per rank).


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


def lora_config(lora: LoraSettings):
    """``learner.lora`` as peft's ``LoraConfig`` (what :func:`add_lora` injects, and what the
    comparison's TRL baselines get as ``peft_config``)."""
    from peft import LoraConfig  # optional: LoRA only

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def lora_errors(lora: LoraSettings):
    """peft's refusal of the adapters (e.g. a target module the architecture does not have) as one
    error line naming ``learner.lora.target_modules``; without LoRA (``r`` 0) errors pass as they are."""
    try:
        yield
    except ValueError as e:
        if not lora.r:
            raise
        msg = " ".join(str(e).split())[:300]
        raise SafeSteerError(f"learner.lora.target_modules={list(lora.target_modules)}: {msg}") from e


def add_lora(model, lora: LoraSettings):
    """Inject LoRA adapters (peft) into ``model``'s ``lora.target_modules`` in place and freeze every
    other weight; returns the peft wrapper (for the adapter's export). ``model`` keeps working as the
    HF module it was, with the adapters in its forward."""
    from peft import get_peft_model  # optional: LoRA only

    with lora_errors(lora):
        return get_peft_model(model, lora_config(lora))


def deepspeed_config(cfg: LearnerConfig, sequences_per_step: int) -> dict:
    world, micro = cfg.world_size, cfg.micro_batch_size
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": sequences_per_step,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": sequences_per_step // (world * micro),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class LearnerWorker:
    """One DeepSpeed rank (wrapped by ``ray.remote`` in :mod:`safesteer.cluster`)."""

    def __init__(
        self,
        rank: int,
        model_path: str,
        cfg: LearnerConfig,
        master_addr: str,
        master_port: int,
        total_steps: int,
        sequences_per_step: int,
        tokens: SafetyTokens | None,
        seed: int,
        model_cfg: ModelConfig,
        teacher: tuple | None = None,
    ):
        """``teacher``: (teacher config, vector blob, output) when this rank also scores as the
        teacher (``teacher.backend=learner``, :class:`safesteer.teacher.LearnerTeacher`)."""
        configure_threads(cfg.threads)
        cuda = torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(cfg.world_size),
            LOCAL_RANK="0" if not cuda else os.environ.get("LOCAL_RANK", "0"),
            LOCAL_SIZE="1",
        )
        if not cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed  # heavy: only the learner ranks need it
        import deepspeed.ops  # heavy: only the learner ranks need it

        # avoid a ~2 min JIT build of the shared-memory allreduce op on CPU
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)

        torch.manual_seed(seed)
        self.rank, self.device = rank, "cuda" if cuda else "cpu"
        self.cfg, self.bf16 = cfg, use_bf16(cfg.bf16, self.device)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code
        )
        model.config.use_cache = False
        freeze_below(model, cfg.train_from_layer)
        self.adapters = add_lora(model, cfg.lora) if cfg.lora.r else None
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total_steps, cfg.warmup_ratio))
        self.model = model
        self.ids = torch.tensor(tokens.ids, device=self.device) if tokens is not None else None
        student = LocalizedStudent(model, self.ids, cfg.loss, cfg.renormalize, self.bf16, cfg.logits_chunk)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=student, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, sequences_per_step)
        )
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.tokens = tokens
        self.steps = 0
        self.teacher = None
        if teacher is not None:
            tok = load_tokenizer(model_path, model_cfg.trust_remote_code, model_cfg.chat_template_kwargs)
            self.teacher = LearnerTeacher(model, self.adapters, *teacher[:2], tokens, teacher[2], tok)

    def score(self, instructions, completion_ids, steer=None) -> dict:
        """The teacher's log-probs, computed by this rank (``teacher.backend=learner``)."""
        if self.teacher is None:
            raise SafeSteerError("this learner rank does not score (teacher.backend is not learner)")
        return self.teacher.score(instructions, completion_ids, steer)

    def safety_tokens_hash(self) -> str | None:
        """The content hash of the safety tokens this rank trains on (checked against the driver's)."""
        return self.tokens.content_hash() if self.tokens is not None else None

    def _micro_loss(self, mb: dict) -> tuple[torch.Tensor, dict]:
        return micro_batch_loss(self.engine, mb, self.device)

    def train_step(self, shard: dict, poison: bool = False) -> dict:
        """One optimizer step over this rank's shard (split into micro-batches).

        A non-finite loss or gradient on any rank makes DeepSpeed skip the update on every rank (the
        global gradient norm is not finite): the weights, Adam state and LR schedule stay as they were
        and ``skipped`` is True. ``poison`` turns this rank's loss into NaN (fault injection for tests).
        """
        t = time.perf_counter()
        self.engine.train()
        n_micro = shard["input_ids"].shape[0] // self.cfg.micro_batch_size
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
        release_freed_memory()
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

    def save_state(self, directory: str) -> str:
        """Write this rank's share of a checkpoint (:func:`safesteer.learner_state.save`)."""
        return learner_state.save(self.engine, self.scheduler, self.rank, self.cfg, self.steps, directory)

    def load_state(self, directory: str) -> int:
        """Restore what :meth:`save_state` wrote; returns the optimizer step it continues from."""
        self.steps = learner_state.load(self.engine, self.scheduler, self.rank, self.cfg, directory)
        return self.steps

    def export_weights(self, dtype: str = "bfloat16") -> bytes | None:
        """Full weights as safetensors bytes on rank 0 (None elsewhere). Every rank must call it (ZeRO-3).

        With LoRA, the adapter's factors instead (:func:`safesteer.core.lora.factor_blob`, float32):
        the receivers merge them into the base weights they read from disk, so no model-sized copy
        is made here or crosses the object store."""
        if self.adapters is not None:
            lora = self.cfg.lora
            return factor_blob(self.model.state_dict(), lora.alpha / lora.r) if self.rank == 0 else None
        dt = getattr(torch, dtype)
        module = self.model
        state = {}
        if self.cfg.zero_stage == 3:
            import deepspeed  # heavy: only the learner ranks need it

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

    def export_adapter(self) -> dict[str, bytes] | None:
        """peft's files for the trained LoRA adapter but its weights (``adapter_config.json``, its
        README), on rank 0; None elsewhere or without LoRA. The weights of the exported step come
        from its factor blob (:func:`safesteer.core.lora.peft_adapter`)."""
        if self.adapters is None or self.rank != 0:
            return None

        with tempfile.TemporaryDirectory() as tmp:
            self.adapters.save_pretrained(tmp, safe_serialization=True)
            files = [p for p in Path(tmp).iterdir() if p.is_file() and p.suffix != ".safetensors"]
            return {p.name: p.read_bytes() for p in files}

    def init_weight_transfer(self, rollout_handles, master_addr: str, master_port: int, tp: int) -> None:
        """Join the NCCL weight-transfer group with the rollout engines (``rollout.weight_sync=nccl``)."""
        skip = ("lm_head.weight",) if self.tied else ()
        source = zero_source(self.model, self.cfg.zero_stage, torch.bfloat16, skip)
        client = RolloutClient(rollout_handles, tp)
        self.transfer = trainer_engine(
            self.rank, master_addr, master_port, len(rollout_handles), tp, client, source
        )

    def send_weights(self) -> float:
        """Broadcast the current weights to every rollout engine over NCCL; returns seconds."""
        t = time.perf_counter()
        self.transfer.send_weights()
        return time.perf_counter() - t
