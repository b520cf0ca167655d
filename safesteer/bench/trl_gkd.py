"""Baseline (c): TRL's GKD trainer on the same model, prompts, samples, lengths and steps.

``GKDTrainer`` with ``lmbda=1`` (every batch is the student's own sampled completions) and ``beta=1``
(its generalized JSD is then the reverse KL, KL(student || teacher), over the full vocabulary). The
teacher is the student's initial weights with the steering hook applied for the whole run, so TRL's
teacher forward is the steered model. Prompts are the pipeline's chat-formatted token ids, each
repeated ``rollout.samples_per_prompt`` times, in the order of the pipeline's step schedule; a step has
the same number of sequences as a pipeline step. Optimizer and schedule are the learner's (AdamW,
cosine with warmup, same clipping); bf16 mixed precision as the learner's autocast; no gradient
checkpointing (TRL's default turns it on, which would also switch off the KV cache in generation).

``python -m safesteer.bench.trl_gkd SPEC.json`` (the runner writes the spec).
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from safesteer.bench.common import compose, measured, read_spec, set_threads, write_result  # noqa: E402


def gkd_classes():
    """``(GKDConfig, GKDTrainer)`` wherever this TRL version keeps them."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def main(argv: list[str] | None = None) -> int:
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback

    from safesteer.core.generation import chat_texts
    from safesteer.core.steering import Teacher, load_vector
    from safesteer.driver import schedule
    from safesteer.learner import cosine_with_warmup
    from safesteer.models import load_hf, use_bf16
    from safesteer.run import device, training_prompts

    GKDConfig, GKDTrainer = gkd_classes()
    spec = read_spec(argv)
    set_threads(spec["threads"])
    cfg = compose(spec["overrides"])
    t_setup = time.perf_counter()
    ln, r = cfg.learner, cfg.rollout
    model_path = cfg.model.path
    trc = cfg.model.trust_remote_code
    torch.manual_seed(cfg.seed)

    teacher_model, tok = load_hf(model_path, dtype="float32", trust_remote_code=trc)
    tok.padding_side = "left"
    instructions, prompt_ids, _ = training_prompts(cfg, tok)
    steps = schedule(len(instructions), cfg)
    k = r.samples_per_prompt
    texts = chat_texts(tok, instructions)
    rows = []
    for step in steps:
        for i in step.prompts:
            for _ in range(k):
                p = list(prompt_ids[i])
                # one placeholder completion token: GKD replaces it by the student's own samples (lmbda=1)
                rows.append(
                    {
                        "prompt": texts[i],
                        "input_ids": p + [tok.eos_token_id],
                        "attention_mask": [1] * (len(p) + 1),
                        "completion_mask": [0] * len(p) + [1],
                    }
                )
    seqs_per_step = len(steps[0].prompts) * k
    micro = spec["micro_batch"]
    vec = load_vector(cfg.steering.vector) if cfg.teacher.kind == "vector" else None
    extra = {"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}
    # GKD's teacher forward sees no prompt boundary: the vector is added at every position (a
    # throughput baseline; the pipeline and the sequential trainer follow teacher.positions)
    teacher = Teacher(kind=cfg.teacher.kind, vector=vec, coeff=cfg.teacher.coeff, positions="all", **extra)
    if teacher.kind != "vector":
        raise SystemExit(
            "the TRL baseline supports teacher.kind=vector only (GKD's teacher sees the same prompt)"
        )

    student = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=trc)
    opt = torch.optim.AdamW(
        student.parameters(), lr=ln.lr, betas=tuple(ln.betas), weight_decay=ln.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(len(steps), ln.warmup_ratio))

    tokens_by_step: dict[int, int] = {}
    generate_s: dict[int, float] = {}

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.ends = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    class MeasuredGKD(GKDTrainer):
        """GKD as is, plus counters: completion tokens entering the loss and generation seconds."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # the pipeline's step order

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            t = time.perf_counter()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            s = self.state.global_step + 1
            generate_s[s] = generate_s.get(s, 0.0) + time.perf_counter() - t
            return out

        def compute_loss(self, model, inputs, *args, **kwargs):
            s = self.state.global_step + 1
            n = int((inputs["labels"][:, 1:] != -100).sum().item())
            tokens_by_step[s] = tokens_by_step.get(s, 0) + n
            return super().compute_loss(model, inputs, *args, **kwargs)

    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="safesteer-gkd-") as tmp, teacher.apply(teacher_model):
        args = GKDConfig(
            output_dir=tmp,
            lmbda=1.0,
            beta=1.0,
            temperature=float(r.temperature),
            max_new_tokens=int(r.max_new_tokens),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=seqs_per_step // micro,
            max_steps=len(steps),
            learning_rate=float(ln.lr),
            max_grad_norm=float(ln.grad_clip),
            bf16=use_bf16(ln.bf16, device()),
            # TRL's SFT-derived default (True) would generate without a KV cache and recompute activations
            # in the backward; the model fits, so turn it off as the other systems do.
            gradient_checkpointing=False,
            use_cpu=not torch.cuda.is_available(),
            seed=int(cfg.seed),
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
        )
        trainer = MeasuredGKD(
            model=student,
            teacher_model=teacher_model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            optimizers=(opt, sched),
            callbacks=[clock],
        )
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    if len(clock.ends) != len(steps):
        raise RuntimeError(f"GKD ran {len(clock.ends)} optimizer steps, expected {len(steps)}")
    per_step = []
    prev = clock.t0
    for n, end in enumerate(clock.ends):
        per_step.append(
            {
                "step": n + 1,
                "tokens": tokens_by_step.get(n + 1, 0),
                "generate_s": generate_s.get(n + 1, 0.0),
                "train_s": end - prev - generate_s.get(n + 1, 0.0),
                "step_s": end - prev,
            }
        )
        print(
            f"trl step {n + 1}/{len(steps)}: {per_step[-1]['tokens']} tokens in {end - prev:.1f}s", flush=True
        )
        prev = end
    write_result(
        spec,
        {
            "system": "trl",
            "trl_version": trl.__version__,
            "trainer": f"{GKDTrainer.__module__}.{GKDTrainer.__name__}",
            "steps": per_step,
            "setup_s": setup_s,
            "threads": torch.get_num_threads(),
            "sequences_per_micro_batch": micro,
            **measured(per_step, spec["warmup_steps"]),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
