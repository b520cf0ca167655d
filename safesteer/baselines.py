"""The training baselines of the comparison, through TRL: SFT on refusals, DPO, on-policy distillation.

Both learn from the same greedy answers, generated once (:func:`paired_answers`): those of the steered
teacher (``teacher.kind``, ``teacher.coeff``, ``teacher.positions``; the vector steers every prompt,
as with ``teacher.gate=label``) and those of the original model, to the prompts a SafeSteer run trains
on (``data.train``, then the anchors ``data.anchor`` when ``trainer.anchors_per_step`` > 0).

- **SFT on refusals** (TRL's ``SFTTrainer``, loss on the completion only): a harmful prompt's target
  is the teacher's refusal, an anchor's the original model's own answer (self-distillation, which
  holds the model to its behaviour on harmless requests as SafeSteer's anchors do).
- **DPO** (TRL's ``DPOTrainer``, sigmoid loss, reference = the original model): on a harmful prompt
  the refusal is chosen over the original answer; on an anchor the original answer over the refusal.

Unlike SafeSteer, both train off-policy on fixed answer texts, every answer token alike (no localized
loss, no teacher distribution). The third, :func:`train_distill`, is on-policy like SafeSteer but
through TRL's ``DistillationTrainer``: the reverse KL to the same steered teacher over the whole
vocabulary at every completion position. Each writes an HF model directory.

With ``learner.lora.r`` > 0 all three train the run's LoRA adapters (TRL's ``peft_config``) instead of
every weight, and the written model has them merged in. DPO's reference is then the policy with its
adapters disabled (TRL's way with peft): no second copy of the model.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from safesteer.core import steering as S
from safesteer.core.generation import chat_texts
from safesteer.data.training import TrainingData
from safesteer.errors import SafeSteerError
from safesteer.learner import lora_config, lora_errors
from safesteer.models import default_device, load_hf, load_tokenizer, use_bf16
from safesteer.paths import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

ANSWER_KEYS = ("prompt", "harmful", "refusal", "original")


# ----------------------------------------------------------------------------------------- answers
@dataclass
class PairedAnswers:
    """Greedy answers of the original model and of the steered teacher to the run's prompts."""

    prompts: list[str]  # the harmful training prompts (data.train), then the anchor prompts (data.anchor)
    harmful: list[bool]  # True for a training prompt
    refusal: list[str]  # the steered teacher's greedy answer
    original: list[str]  # the original model's greedy answer

    def __post_init__(self):
        n = len(self.prompts)
        if not len(self.harmful) == len(self.refusal) == len(self.original) == n:
            raise SafeSteerError(
                f"paired answers: {n} prompts but {len(self.harmful)} labels, {len(self.refusal)} refusals "
                f"and {len(self.original)} original answers"
            )


def run_prompts(cfg, tok) -> tuple[list[str], list[bool]]:
    """The instructions a SafeSteer run trains on (:meth:`TrainingData.build`: the training prompts,
    then the anchors, too-long ones skipped) and which of them are training prompts."""
    data = TrainingData.build(cfg, tok)
    return data.instructions, [i < data.n_train for i in range(len(data.instructions))]


def paired_answers(cfg, model_path: str, vector_path: Path | None, max_new_tokens: int) -> PairedAnswers:
    """The steered teacher's and the original model's greedy answers (at most ``max_new_tokens``
    tokens) to every prompt of the run (:func:`run_prompts`), from one vLLM engine with the hook in its
    worker (:class:`safesteer.inference.SteeringEngine`). The teacher answers the anchors steered too:
    the over-refusals DPO learns to avoid there."""
    from safesteer.inference import SteeringEngine  # imports vLLM's engine side

    tok = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    prompts, harmful = run_prompts(cfg, tok)
    sv = None
    if vector_path is not None:
        shape = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
        shape = shape.get_text_config()
        sv = S.load_vector(vector_path, shape.hidden_size, shape.num_hidden_layers)
    extra = {"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}
    teacher = S.Teacher(
        kind=cfg.teacher.kind, vector=sv, coeff=cfg.teacher.coeff, positions=cfg.teacher.positions, **extra
    )

    def ids(texts: list[str]) -> list[list[int]]:
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    plain = ids(teacher.prompt_texts(tok, prompts, steer=False))  # no system prompt: the original model's
    steered = ids(teacher.prompt_texts(tok, prompts))
    engine = SteeringEngine(cfg, model_path, sv, max(0, max(map(len, steered)) - max(map(len, plain))))
    try:
        log.info("paired answers (%d tokens): the original model's, then the teacher's", max_new_tokens)
        original = engine.greedy(plain, max_new_tokens)
        coeff = teacher.coefficient() if teacher.kind == "vector" else 0.0
        refusal = engine.greedy(steered, max_new_tokens, coeff, teacher.positions)
    finally:
        engine.close()

    def texts(ids: list[list[int]]) -> list[str]:
        return [tok.decode(x, skip_special_tokens=True) for x in ids]

    return PairedAnswers(prompts, harmful, texts(refusal), texts(original))


def save_answers(path: Path, answers: PairedAnswers) -> None:
    """One JSON object per prompt (``prompt``, ``harmful``, ``refusal``, ``original``), atomically."""
    rows = zip(answers.prompts, answers.harmful, answers.refusal, answers.original)
    lines = [json.dumps(dict(zip(ANSWER_KEYS, row)), ensure_ascii=False) for row in rows]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


def load_answers(path: Path) -> PairedAnswers:
    """What :func:`save_answers` wrote; a malformed line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise SafeSteerError(f"{path}: paired answers not found")
    cols: dict[str, list] = {k: [] for k in ANSWER_KEYS}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            values = [row[k] for k in ANSWER_KEYS]
        except (ValueError, KeyError, TypeError) as e:
            raise SafeSteerError(f"{path}:{n}: not a paired-answer row ({e})") from e
        prompt, harmful, refusal, original = values
        if not (all(isinstance(v, str) for v in (prompt, refusal, original)) and isinstance(harmful, bool)):
            raise SafeSteerError(
                f"{path}:{n}: expected strings and a boolean 'harmful' in a paired-answer row"
            )
        for k, v in zip(ANSWER_KEYS, values):
            cols[k].append(v)
    return PairedAnswers(cols["prompt"], cols["harmful"], cols["refusal"], cols["original"])


# ---------------------------------------------------------------------------------------- datasets
def _turns(prompt: str, **answers: str) -> dict:
    """A conversational TRL example: the user's turn, and each answer as an assistant turn."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        **{k: [{"role": "assistant", "content": v}] for k, v in answers.items()},
    }


def _check_harmful(kept: Sequence[bool], a: PairedAnswers, method: str, rule: str) -> None:
    """Fail when no harmful prompt made an example (``kept``: the kept examples' ``harmful``); say how
    many prompts were left out."""
    n = sum(a.harmful)
    if n == 0:
        raise SafeSteerError(
            f"{method} baseline: no harmful prompt among the {len(a.prompts)} paired answers"
        )
    if not any(kept):
        raise SafeSteerError(f"{method} baseline: none of the {n} harmful prompts has {rule}")
    if len(kept) < len(a.prompts):
        log.warning("%s baseline: %d of %d prompts left out (an example needs %s)", method,
                    len(a.prompts) - len(kept), len(a.prompts), rule)  # fmt: skip


def sft_examples(a: PairedAnswers) -> list[dict]:
    """Conversational prompt/completion examples: a harmful prompt's completion is the teacher's
    refusal, an anchor's the original model's own answer.

    Answers are stripped of surrounding whitespace (the template ends the turn after them; a leading
    newline would merge with the template's and move the prompt/completion boundary TRL finds), and
    empty ones are left out."""
    out, kept = [], []
    for p, h, r, o in zip(a.prompts, a.harmful, a.refusal, a.original):
        target = (r if h else o).strip()
        if target:
            out.append(_turns(p, completion=target))
            kept.append(h)
    _check_harmful(kept, a, "SFT", "a non-empty target answer")
    return out


def dpo_examples(a: PairedAnswers) -> list[dict]:
    """Conversational prompt/chosen/rejected examples: on a harmful prompt the refusal is chosen over
    the original answer; on an anchor the original answer over the refusal. Answers are stripped as
    in :func:`sft_examples`; pairs with an empty chosen answer, or two equal answers (no preference),
    are left out."""
    out, kept = [], []
    for p, h, r, o in zip(a.prompts, a.harmful, a.refusal, a.original):
        chosen, rejected = (r.strip(), o.strip()) if h else (o.strip(), r.strip())
        if chosen and chosen != rejected:
            out.append(_turns(p, chosen=chosen, rejected=rejected))
            kept.append(h)
    _check_harmful(kept, a, "DPO", "a non-empty chosen answer that differs from the rejected one")
    return out


# ---------------------------------------------------------------------------------------- training
@dataclass
class Trained:
    model_dir: Path
    wall_seconds: float  # loading, tokenizing, training and saving (not the answers' generation)
    trained_tokens: int  # completion tokens trained on (summed over epochs; a fraction's share)
    steps: int  # optimizer steps


def _with_template_kwargs(cfg, examples: list[dict]) -> list[dict]:
    """``model.chat_template_kwargs`` on every example: TRL 1.16's SFT and DPO trainers pass an
    example's ``chat_template_kwargs`` to ``apply_chat_template`` (their configs have no such option)."""
    kw = dict(cfg.model.chat_template_kwargs or {})
    return [{**e, "chat_template_kwargs": kw} for e in examples] if kw else list(examples)


def _check_settings(lr: float, epochs: float) -> None:
    if not epochs > 0:
        raise SafeSteerError(f"epochs={epochs}: must be positive (a fraction trains part of an epoch)")
    if not lr > 0:
        raise SafeSteerError(f"lr={lr}: the learning rate must be positive")


def training_args(cfg, n_examples: int, lr: float, epochs: float, output_dir: str) -> dict:
    """The ``TrainingArguments`` both baselines get: the learner's optimizer settings, and per optimizer
    step about the examples a SafeSteer step trains on (``trainer.prompts_per_step`` +
    ``trainer.anchors_per_step``), in micro-batches of the largest divisor of that number up to
    ``learner.micro_batch_size`` (a DPO example is two sequences, chosen and rejected)."""
    _check_settings(lr, epochs)
    ln, tr = cfg.learner, cfg.trainer
    per_step = max(1, min(n_examples, tr.prompts_per_step + (tr.anchors_per_step if cfg.data.anchor else 0)))
    micro = next(d for d in range(min(per_step, ln.micro_batch_size), 0, -1) if per_step % d == 0)
    device = default_device()
    return dict(
        output_dir=output_dir,
        num_train_epochs=float(epochs),  # a fraction: that share of an epoch's steps (rounded up)
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro,
        learning_rate=float(lr),
        optim="adamw_torch",
        adam_beta1=float(ln.betas[0]),
        adam_beta2=float(ln.betas[1]),
        weight_decay=float(ln.weight_decay),
        max_grad_norm=float(ln.grad_clip),
        lr_scheduler_type="cosine",
        warmup_steps=float(ln.warmup_ratio),  # transformers 5: a float in [0, 1) is a ratio of the steps
        bf16=use_bf16(ln.bf16, device),  # TRL's configs default to bf16=True
        gradient_checkpointing=False,  # TRL's configs default to True
        use_cpu=not device.startswith("cuda"),
        seed=int(cfg.seed),
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        max_length=None,  # no truncation: a prompt is at most model.max_prompt_tokens, an answer is bounded
    )


def _peft(cfg):
    """TRL's ``peft_config``: the learner's LoRA adapters (``learner.lora``), None without LoRA."""
    return lora_config(cfg.learner.lora) if cfg.learner.lora.r else None


def _save(trainer, tok, out: Path) -> Path:
    """The trained weights (safetensors: transformers 5 writes no other format; LoRA adapters merged
    in), the generation config and the tokenizer with its chat template, in ``out`` atomically."""
    out = Path(out)
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _train(trainer, what: str) -> int:
    """Train; returns the optimizer steps taken. A non-finite mean loss is an error (nothing is saved)."""
    result = trainer.train()
    log.info("%s baseline: %d optimizer steps, mean training loss %.4f", what, result.global_step,
             result.training_loss)  # fmt: skip
    if not math.isfinite(result.training_loss):
        raise SafeSteerError(f"{what} baseline: the training loss is not finite; lower the learning rate")
    return result.global_step


def _policy(cfg, model_path: str):
    """(the model to train, its tokenizer), float32, seeded."""
    torch.manual_seed(int(cfg.seed))
    return load_hf(model_path, "float32", cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)


def _frozen_copy(cfg, model_path: str):
    """A frozen second copy of the original model (DPO's reference without LoRA, the distillation
    teacher): what TRL would load itself from the policy's path, with the same dtype and
    ``trust_remote_code``."""
    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
    ).eval()


def train_sft(cfg, model_path: str, examples: list[dict], lr: float, epochs: float, out: Path) -> Trained:
    """Supervised fine-tuning on :func:`sft_examples` with TRL's ``SFTTrainer`` (loss on the
    completion only), written to ``out``."""
    # optional: the comparison's baselines only
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise SafeSteerError("SFT baseline: no training example")
    _check_settings(lr, epochs)
    t0 = time.perf_counter()
    model, tok = _policy(cfg, model_path)
    with tempfile.TemporaryDirectory(prefix="safesteer-sft-") as tmp:
        args = SFTConfig(
            completion_only_loss=True,
            packing=False,
            **training_args(cfg, len(examples), lr, epochs, tmp),
        )
        with lora_errors(cfg.learner.lora):
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(_with_template_kwargs(cfg, examples)),
                processing_class=tok,
                peft_config=_peft(cfg),
            )
        tokens = sum(sum(x != -100 for x in row) for row in trainer.train_dataset["labels"])
        steps = _train(trainer, "SFT")
        model_dir = _save(trainer, tok, out)
    del trainer, model
    gc.collect()  # a comparison trains several baselines in one process
    return Trained(model_dir, time.perf_counter() - t0, round(int(tokens) * epochs), steps)


def train_dpo(
    cfg, model_path: str, examples: list[dict], beta: float, lr: float, epochs: float, out: Path
) -> Trained:
    """DPO on :func:`dpo_examples` with TRL's ``DPOTrainer`` (sigmoid loss, ``beta``), against a frozen
    reference: a second copy of the original model loaded from ``model_path`` (what TRL would load
    itself from the policy's path, here with the same dtype and ``trust_remote_code``), or with LoRA
    the policy with its adapters disabled; written to ``out``."""
    # optional: the comparison's baselines only
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not examples:
        raise SafeSteerError("DPO baseline: no preference pair")
    if not beta > 0:
        raise SafeSteerError(f"beta={beta}: DPO's beta must be positive")
    _check_settings(lr, epochs)
    t0 = time.perf_counter()
    peft = _peft(cfg)
    model, tok = _policy(cfg, model_path)
    ref = _frozen_copy(cfg, model_path) if peft is None else None  # with LoRA: the adapters disabled
    with tempfile.TemporaryDirectory(prefix="safesteer-dpo-") as tmp:
        args = DPOConfig(
            loss_type=["sigmoid"],  # a list in TRL 1.16 (several losses can be mixed)
            beta=float(beta),
            **training_args(cfg, len(examples), lr, epochs, tmp),
        )
        with lora_errors(cfg.learner.lora):
            trainer = DPOTrainer(
                model=model,
                ref_model=ref,
                args=args,
                train_dataset=Dataset.from_list(_with_template_kwargs(cfg, examples)),
                processing_class=tok,
                peft_config=peft,
            )
        ds = trainer.train_dataset
        tokens = sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"]))
        steps = _train(trainer, "DPO")
        model_dir = _save(trainer, tok, out)
    del trainer, model, ref
    gc.collect()  # a comparison trains several baselines in one process
    return Trained(model_dir, time.perf_counter() - t0, round(int(tokens) * epochs), steps)


def train_distill(cfg, model_path: str, vector_path: Path | None, lr: float, out: Path) -> Trained:
    """On-policy distillation to the same steered teacher with TRL's ``DistillationTrainer``: the
    student samples, the teacher scores, reverse KL (``beta=1``) over the whole vocabulary at every
    completion position. The SafeSteer run's plan (its steps and prompts, ``rollout.samples_per_prompt``
    completions of ``rollout.max_new_tokens`` per prompt) and the learner's optimizer settings, at
    learning rate ``lr``. The teacher is a frozen copy of the original with the vector on the prompt's
    positions (``teacher.positions``) at ``teacher.coeff`` on training prompts and ``teacher.anchor_coeff``
    on anchors, as the run's teacher scores them; HF generation. Written to ``out``."""
    # optional: the comparison's baselines only
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    if vector_path is None or cfg.teacher.kind != "vector":
        raise SafeSteerError("TRL distillation baseline: needs the steered teacher (teacher.kind=vector)")
    _check_settings(lr, 1)
    t0 = time.perf_counter()
    model, tok = _policy(cfg, model_path)
    teacher_model = _frozen_copy(cfg, model_path)
    sv = S.load_vector(vector_path, model.config.hidden_size, len(S.decoder_layers(model)))
    teacher = S.Teacher(vector=sv, coeff=cfg.teacher.coeff, anchor_coeff=cfg.teacher.anchor_coeff,
                        positions=cfg.teacher.positions)  # fmt: skip
    data = TrainingData.build(cfg, tok)
    k, r = int(cfg.rollout.samples_per_prompt), cfg.rollout
    order = [i for step in data.plan for i in step for _ in range(k)]
    texts = chat_texts(tok, data.instructions)
    ids_of = {texts[i]: list(data.ids[i]) for i in order}
    coeff_of = {tuple(data.ids[i]): teacher.coefficient(i < data.n_train) for i in order}
    per_step = len(data.plan[0]) * k
    micro = next(d for d in range(min(per_step, cfg.learner.micro_batch_size), 0, -1) if per_step % d == 0)
    tokens = [0]

    class SteeredDistillation(DistillationTrainer):
        """DistillationTrainer whose teacher forward has the steering hook, per row and position."""

        def _tokenize_prompts(self, prompts):  # the run's own prompt ids (no second BOS)
            return [ids_of[p] for p in prompts], None, {}

        def compute_loss(self, model, inputs, *args, **kwargs):
            pm, cm = inputs["prompt_mask"], inputs["completion_mask"]
            rows = [tuple(x[m.bool()].tolist()) for x, m in zip(inputs["prompt_ids"], pm)]
            where = torch.cat([pm, cm if teacher.positions == "all" else torch.zeros_like(cm)], 1).float()
            where = where * torch.tensor([coeff_of[x] for x in rows], device=pm.device).unsqueeze(1)
            tokens[0] += int(cm.sum())
            with S.steering(self.teacher_model, sv.layer, sv.vector, 1.0, "prompt", where):
                return super().compute_loss(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory(prefix="safesteer-distill-") as tmp:
        args = training_args(cfg, len(order), lr, 1, tmp)
        args.update(per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro)
        for key in ("num_train_epochs", "max_length"):
            args.pop(key)
        config = DistillationConfig(
            beta=1.0, max_steps=len(data.plan), max_completion_length=int(r.max_new_tokens),
            temperature=float(r.temperature), top_p=float(r.top_p), top_k=0, shuffle_dataset=False,
            use_vllm=False, remove_unused_columns=False, **args,
        )  # fmt: skip
        with lora_errors(cfg.learner.lora):
            trainer = SteeredDistillation(
                model=model,
                teacher_model=teacher_model,
                args=config,
                train_dataset=Dataset.from_list([{"prompt": texts[i]} for i in order]),
                processing_class=tok,
                peft_config=_peft(cfg),
            )
        steps = _train(trainer, "TRL distillation")
        model_dir = _save(trainer, tok, out)
    del trainer, model, teacher_model
    gc.collect()
    return Trained(model_dir, time.perf_counter() - t0, tokens[0], steps)
