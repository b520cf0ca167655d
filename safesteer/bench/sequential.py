"""Baseline (b): the SafeSteer algorithm in one process, one stage after the other.

Per step: HF ``generate`` samples the student's completions (same temperature, top-p, length and
samples per prompt as the rollout workers, no top-k), the steered teacher scores them at the safety
ids (:func:`safesteer.core.scoring.score_completions`, float32, as the teacher actor does), and the
student takes one AdamW step on the learners' localized loss (:class:`safesteer.core.loss.LocalizedStudent`,
the chunked head included) under the learner's bf16 autocast, with the learner's micro-batching,
clipping and learning-rate schedule. Generation runs under the same autocast (it is faster than
float32 on CPU). One process, one thread pool.

``python -m safesteer.bench.sequential SPEC.json`` (the runner writes the spec).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from safesteer.bench.common import compose, measured, read_spec, set_threads, write_result
from safesteer.core.batch import collate, split, to_sequence_positions
from safesteer.core.generation import stop_token_ids
from safesteer.core.loss import LocalizedStudent, micro_batch_loss
from safesteer.core.scoring import score_completions
from safesteer.core.steering import Teacher, load_vector
from safesteer.core.tokens import SafetyTokens
from safesteer.data.training import schedule, training_prompts
from safesteer.learner import cosine_with_warmup
from safesteer.models import default_device, load_hf, use_bf16
from safesteer.teacher import OUTPUT_FOR_LOSS


def sample(
    model,
    prompts: list[list[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    stop: set[int],
    pad_id: int,
    bf16: bool,
) -> list[list[int]]:
    """``n`` sampled completions per prompt (grouped by prompt), each cut after its first stop token
    (kept, as the rollout workers keep it)."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    model.eval()
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        L = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding
            ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p) :] = 1
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            seqs = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=pad_id,
                eos_token_id=sorted(stop),
                use_cache=True,
            )
        for row in seqs[:, L:].tolist():
            comp = []
            for t in row:
                comp.append(t)
                if t in stop:
                    break
            out.append(comp)
    return out


@dataclass
class Workload:
    """The one process's models, data and optimizer."""

    cfg: Any
    tok: Any
    teacher_model: Any
    teacher: Teacher
    ids: torch.Tensor  # the safety ids
    student: LocalizedStudent
    instructions: list[str]
    prompt_ids: list[list[int]]
    plan: list[list[int]]
    optimizers: tuple
    bf16: bool
    device: str


def setup(cfg) -> Workload:
    device = default_device()
    torch.manual_seed(cfg.seed)
    teacher_model, tok = load_hf(
        cfg.model.path, dtype="float32", trust_remote_code=cfg.model.trust_remote_code
    )
    teacher_model.to(device)
    vec = load_vector(cfg.steering.vector) if cfg.teacher.kind == "vector" else None
    extra = {"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}
    teacher = Teacher(kind=cfg.teacher.kind, vector=vec, coeff=cfg.teacher.coeff, positions=cfg.teacher.positions,
                      **extra)  # fmt: skip
    ids = torch.tensor(SafetyTokens.load(cfg.tokens.path).ids, device=device)
    lm = AutoModelForCausalLM.from_pretrained(
        cfg.model.path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
    ).to(device)
    ln = cfg.learner
    bf16 = use_bf16(ln.bf16, device)
    student = LocalizedStudent(lm, ids, ln.loss, ln.renormalize, bf16, ln.logits_chunk)
    instructions, prompt_ids, _ = training_prompts(cfg, tok)
    plan = schedule(len(instructions), cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=ln.lr, betas=tuple(ln.betas), weight_decay=ln.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(len(plan), ln.warmup_ratio))
    return Workload(cfg, tok, teacher_model, teacher, ids, student, instructions, prompt_ids, plan, (opt, sched),
                    bf16, device)  # fmt: skip


def teacher_batch(w: Workload, prompts: list[int], comps: list[list[int]]) -> dict:
    """The steered teacher's log-probs over the completions, at sequence positions of the batch."""
    k, cfg = w.cfg.rollout.samples_per_prompt, w.cfg
    ins = [w.instructions[i] for i in prompts for _ in range(k)]
    p_ids = [w.prompt_ids[i] for i in prompts for _ in range(k)]
    scored = score_completions(w.teacher_model, w.tok, w.teacher, ins, comps, OUTPUT_FOR_LOSS[cfg.learner.loss],
                               w.ids, cfg.teacher.topk, cfg.teacher.logits_chunk, cfg.teacher.batch_size)  # fmt: skip
    batch = collate(p_ids, comps, w.tok.pad_token_id)
    L = batch["input_ids"].shape[1]
    for key, name in (("logprobs", "teacher_logprobs"), ("ids", "teacher_ids")):
        if key in scored:
            batch[name] = to_sequence_positions(
                scored[key].cpu(), batch["prompt_lens"], batch["completion_lens"], L
            )
    return batch


def learner_step(w: Workload, batch: dict, micro: int) -> tuple[float, float]:
    """One AdamW step over the batch's micro-batches; returns (mean loss, gradient norm)."""
    opt, sched = w.optimizers
    w.student.train()
    n_micro = batch["input_ids"].shape[0] // micro
    loss_sum = 0.0
    for mb in split(batch, n_micro):
        loss, stats = micro_batch_loss(w.student, mb, w.device)
        (loss / n_micro).backward()
        loss_sum += stats["loss_sum"]
    grad_norm = torch.nn.utils.clip_grad_norm_(w.student.parameters(), w.cfg.learner.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum / batch["input_ids"].shape[0], float(grad_norm)


def main(argv: list[str] | None = None) -> int:
    spec = read_spec(argv)
    set_threads(spec["threads"])
    cfg = compose(spec["overrides"])
    t_setup = time.perf_counter()
    w = setup(cfg)
    r, k = cfg.rollout, cfg.rollout.samples_per_prompt
    stop = stop_token_ids(w.student.lm, w.tok)
    setup_s = time.perf_counter() - t_setup
    per_step = []
    for n, prompts in enumerate(w.plan):
        t0 = time.perf_counter()
        comps = sample(w.student.lm, [w.prompt_ids[i] for i in prompts], k, r.temperature, r.top_p,
                       r.max_new_tokens, spec["gen_batch"], stop, w.tok.pad_token_id, w.bf16)  # fmt: skip
        t1 = time.perf_counter()
        batch = teacher_batch(w, prompts, comps)
        t2 = time.perf_counter()
        loss, grad_norm = learner_step(w, batch, spec["micro_batch"])
        t3 = time.perf_counter()
        tokens = int(batch["completion_mask"].sum().item())
        per_step.append({"step": n + 1, "tokens": tokens, "loss": loss, "grad_norm": grad_norm,
                         "generate_s": t1 - t0, "teacher_s": t2 - t1, "learner_s": t3 - t2, "step_s": t3 - t0})  # fmt: skip
        print(
            f"sequential step {n + 1}/{len(w.plan)}: {tokens} tokens in {t3 - t0:.1f}s "
            f"(generate {t1 - t0:.1f}s, teacher {t2 - t1:.1f}s, learner {t3 - t2:.1f}s)",
            flush=True,
        )
    result = {
        "system": "sequential",
        "steps": per_step,
        "setup_s": setup_s,
        "threads": torch.get_num_threads(),
    }
    write_result(spec, {**result, **measured(per_step, spec["warmup_steps"])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
