"""Baseline (b): the SafeSteer algorithm in one process, one stage after the other.

Per step: HF ``generate`` samples the student's completions (same temperature, top-p, length and
samples per prompt as the rollout workers, no top-k), the steered teacher scores them at the safety
ids (:func:`safesteer.teacher.score_completions`, float32, as the teacher actor does), and the student
takes one AdamW step on the localized reverse KL (:mod:`safesteer.core.loss`) under the learner's bf16
autocast, with the learner's micro-batching, clipping and learning-rate schedule. Generation runs
under the same autocast (it is faster than float32 on CPU). One process, one thread pool.

``python -m safesteer.bench.sequential SPEC.json`` (the runner writes the spec).
"""

from __future__ import annotations

import time

import torch

from safesteer.bench.common import compose, measured, read_spec, set_threads, write_result


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


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from safesteer.core.batch import collate, split, to_sequence_positions, trim
    from safesteer.core.generation import stop_token_ids
    from safesteer.core.loss import localized_reverse_kl_terms, sequence_mean
    from safesteer.core.scoring import right_padded_positions
    from safesteer.core.steering import Teacher, load_vector
    from safesteer.core.tokens import SafetyTokens
    from safesteer.driver import schedule
    from safesteer.learner import cosine_with_warmup
    from safesteer.models import load_hf, use_bf16
    from safesteer.run import training_prompts
    from safesteer.teacher import OUTPUT_FOR_LOSS, score_completions

    spec = read_spec(argv)
    set_threads(spec["threads"])
    cfg = compose(spec["overrides"])
    t_setup = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_path = cfg.model.path
    torch.manual_seed(cfg.seed)

    teacher_model, tok = load_hf(model_path, dtype="float32", trust_remote_code=cfg.model.trust_remote_code)
    teacher_model.to(device)
    vec = load_vector(cfg.steering.vector) if cfg.teacher.kind == "vector" else None
    extra = {"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}
    teacher = Teacher(
        kind=cfg.teacher.kind, vector=vec, coeff=cfg.teacher.coeff, positions=cfg.teacher.positions, **extra
    )
    safety = SafetyTokens.load(cfg.tokens.path)
    ids = torch.tensor(safety.ids, device=device)
    output = OUTPUT_FOR_LOSS[cfg.learner.loss]

    student = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
    ).to(device)
    ln = cfg.learner
    bf16 = use_bf16(ln.bf16, device)
    instructions, prompt_ids, _ = training_prompts(cfg, tok)
    steps = schedule(len(instructions), cfg)
    opt = torch.optim.AdamW(
        student.parameters(), lr=ln.lr, betas=tuple(ln.betas), weight_decay=ln.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(len(steps), ln.warmup_ratio))
    stop = stop_token_ids(student, tok)
    r = cfg.rollout
    k = r.samples_per_prompt
    micro = spec["micro_batch"]
    setup_s = time.perf_counter() - t_setup

    per_step = []
    for n, step in enumerate(steps):
        t0 = time.perf_counter()
        comps = sample(
            student,
            [prompt_ids[i] for i in step.prompts],
            k,
            r.temperature,
            r.top_p,
            r.max_new_tokens,
            spec["gen_batch"],
            stop,
            tok.pad_token_id,
            bf16,
        )
        t1 = time.perf_counter()
        ins = [instructions[i] for i in step.prompts for _ in range(k)]
        p_ids = [prompt_ids[i] for i in step.prompts for _ in range(k)]
        scored = score_completions(
            teacher_model,
            tok,
            teacher,
            ins,
            comps,
            output,
            ids,
            cfg.teacher.topk,
            cfg.teacher.chunk_size,
            cfg.teacher.batch_size,
        )
        t2 = time.perf_counter()
        batch = collate(p_ids, comps, tok.pad_token_id)
        L = batch["input_ids"].shape[1]
        batch["teacher_logprobs"] = to_sequence_positions(
            scored["logprobs"].cpu(), batch["prompt_lens"], batch["completion_lens"], L
        )
        if "ids" in scored:
            batch["teacher_ids"] = to_sequence_positions(
                scored["ids"].cpu(), batch["prompt_lens"], batch["completion_lens"], L
            )
        student.train()
        n_micro = batch["input_ids"].shape[0] // micro
        loss_sum = 0.0
        for mb in split(batch, n_micro):
            mb = {key: v.to(device) for key, v in trim(mb).items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = student(
                    input_ids=mb["input_ids"],
                    attention_mask=mb["attention_mask"],
                    position_ids=right_padded_positions(mb["attention_mask"]),
                    use_cache=False,
                ).logits[:, :-1]
            terms = localized_reverse_kl_terms(
                logits,
                mb["teacher_logprobs"],
                mb.get("teacher_ids", ids),
                ln.loss,
                ln.renormalize,
                target_ids=mb["input_ids"][:, 1:],
            )
            per_seq = sequence_mean(terms, mb["completion_mask"])
            (per_seq.mean() / n_micro).backward()
            loss_sum += per_seq.sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), ln.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        tokens = int(batch["completion_mask"].sum().item())
        per_step.append(
            {
                "step": n + 1,
                "tokens": tokens,
                "loss": loss_sum / batch["input_ids"].shape[0],
                "grad_norm": float(grad_norm),
                "generate_s": t1 - t0,
                "teacher_s": t2 - t1,
                "learner_s": t3 - t2,
                "step_s": t3 - t0,
            }
        )
        print(
            f"sequential step {n + 1}/{len(steps)}: {tokens} tokens in {t3 - t0:.1f}s "
            f"(generate {t1 - t0:.1f}s, teacher {t2 - t1:.1f}s, learner {t3 - t2:.1f}s)",
            flush=True,
        )
    write_result(
        spec,
        {
            "system": "sequential",
            "steps": per_step,
            "setup_s": setup_s,
            "threads": torch.get_num_threads(),
            **measured(per_step, spec["warmup_steps"]),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
