"""What the benchmark's systems share: the composed config, the step schedule, and the result file.

A system process gets a *spec* (a JSON file written by the runner) naming the Hydra overrides that
define the workload, the number of warm-up and measured steps, and where to write its result. The
config is composed from ``conf/`` with the same overrides the pipeline gets, so every system reads the
same prompts, samples, lengths, loss, learning rate and schedule.

The TRL baselines (:mod:`safesteer.bench.trl_gkd`, :mod:`safesteer.bench.trl_distill`) share their
set-up, training arguments, step clock and result here (:func:`run_trl`); each adds only its trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from safesteer import config
from safesteer.core.generation import chat_texts
from safesteer.core.steering import Teacher, load_vector
from safesteer.data.training import schedule, training_prompts
from safesteer.learner import cosine_with_warmup
from safesteer.models import default_device, load_hf, use_bf16
from safesteer.paths import atomic_write_json


def compose(overrides: list[str], check: bool = True):
    """The run config for ``overrides`` (as ``python -m safesteer.run`` would see it), validated."""
    return config.compose(overrides, check=check)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest d <= cap with n % d == 0 (at least 1)."""
    for d in range(min(n, max(1, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def peak_rss_mb_self() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def read_spec(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m safesteer.bench.<system> SPEC.json (written by safesteer.bench)")
    return json.loads(Path(args[0]).read_text())


def set_threads(n: int) -> None:
    """One intra-op thread pool of ``n`` threads for the whole process."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(max(1, n))


def measured(per_step: list[dict], warmup: int) -> dict:
    """Totals over the steps after the warm-up: tokens, wall seconds and trained tokens per second."""
    rows = per_step[warmup:]
    tokens = sum(r["tokens"] for r in rows)
    wall = sum(r["step_s"] for r in rows)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0}


def write_result(spec: dict, result: dict) -> None:
    result = {**result, "peak_rss_mb_self": peak_rss_mb_self(), "pid": os.getpid()}
    atomic_write_json(Path(spec["result"]), result)


# ------------------------------------------------------------------------------------------ TRL baselines
@dataclass
class TrlWorkload:
    """What a TRL baseline trains on, set up as the pipeline's step schedule has it."""

    spec: dict
    cfg: object
    tok: object
    steps: list  # the pipeline's step schedule (safesteer.data.training.schedule)
    texts: list[str]  # each training prompt, chat-formatted
    prompt_ids: list[list[int]]  # and its token ids, as the pipeline's rollout gets them
    order: list[int]  # the prompt of every sequence, in step order (each one samples_per_prompt times)
    seqs_per_step: int
    teacher: object  # safesteer.core.steering.Teacher; teacher.apply(teacher_model) steers it
    teacher_model: object  # the student's initial weights
    student: object
    optimizers: tuple  # (AdamW, cosine-with-warmup LambdaLR) as the learner's
    t_setup: float
    counts: dict = field(default_factory=lambda: {"tokens": {}, "generate_s": {}})

    def add(self, what: str, step: int, value: float) -> None:
        """Add ``value`` to counter ``what`` (tokens, generate_s) of optimizer step ``step`` (1-based)."""
        self.counts[what][step] = self.counts[what].get(step, 0) + value

    @contextlib.contextmanager
    def generating(self, step: int):
        """Count the seconds inside as generation of optimizer step ``step``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add("generate_s", step, time.perf_counter() - t)


def trl_workload(spec: dict) -> TrlWorkload:
    """The config, prompts, steered teacher, student and optimizer of a TRL baseline."""
    set_threads(spec["threads"])
    cfg = compose(spec["overrides"])
    t_setup = time.perf_counter()
    ln = cfg.learner
    model_path, trc = cfg.model.path, cfg.model.trust_remote_code
    torch.manual_seed(cfg.seed)

    teacher_model, tok = load_hf(model_path, dtype="float32", trust_remote_code=trc)
    tok.padding_side = "left"
    instructions, prompt_ids, _ = training_prompts(cfg, tok)
    steps = schedule(len(instructions), cfg)
    k = cfg.rollout.samples_per_prompt
    order = [i for step in steps for i in step for _ in range(k)]
    vec = load_vector(cfg.steering.vector) if cfg.teacher.kind == "vector" else None
    extra = {"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}
    # TRL's teacher forward sees no prompt boundary: the vector is added at every position (a
    # throughput baseline; the pipeline and the sequential trainer follow teacher.positions)
    teacher = Teacher(kind=cfg.teacher.kind, vector=vec, coeff=cfg.teacher.coeff, positions="all", **extra)
    if teacher.kind != "vector":
        raise SystemExit(
            "the TRL baselines support teacher.kind=vector only (TRL's teacher sees the student's prompt)"
        )

    student = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=trc)
    opt = torch.optim.AdamW(
        student.parameters(), lr=ln.lr, betas=tuple(ln.betas), weight_decay=ln.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(len(steps), ln.warmup_ratio))
    return TrlWorkload(
        spec=spec,
        cfg=cfg,
        tok=tok,
        steps=steps,
        texts=chat_texts(tok, instructions),
        prompt_ids=[list(p) for p in prompt_ids],
        order=order,
        seqs_per_step=len(steps[0]) * k,
        teacher=teacher,
        teacher_model=teacher_model,
        student=student,
        optimizers=(opt, sched),
        t_setup=t_setup,
    )


def trl_training_args(w: TrlWorkload, output_dir: str) -> dict:
    """The ``TrainingArguments`` both TRL configs get: batch, steps, learner settings, no extras."""
    ln, micro = w.cfg.learner, w.spec["micro_batch"]
    return dict(
        output_dir=output_dir,
        temperature=float(w.cfg.rollout.temperature),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=w.seqs_per_step // micro,
        max_steps=len(w.steps),
        learning_rate=float(ln.lr),
        max_grad_norm=float(ln.grad_clip),
        bf16=use_bf16(ln.bf16, default_device()),
        # TRL's SFT-derived default (True) would generate without a KV cache and recompute activations
        # in the backward; the model fits, so turn it off as the other systems do.
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        seed=int(w.cfg.seed),
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )


def step_clock():
    """A ``TrainerCallback`` that notes when training starts and when each optimizer step ends."""

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.ends = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    return Clock()


def run_trl(argv: list[str] | None, system: str, build: Callable) -> int:
    """Run one TRL baseline and write its result. ``build(workload, training_args)`` returns the
    trainer class, its config and the train dataset; the trainer gets the student, the steered teacher
    (the steering context lasts the whole run), the tokenizer, the optimizer and the step clock."""
    import trl  # optional: the TRL baselines only

    spec = read_spec(argv)
    w = trl_workload(spec)
    clock = step_clock()
    with (
        tempfile.TemporaryDirectory(prefix=f"safesteer-{system}-") as tmp,
        w.teacher.apply(w.teacher_model),
    ):
        trainer_class, config, dataset = build(w, trl_training_args(w, tmp))
        trainer = trainer_class(
            model=w.student,
            teacher_model=w.teacher_model,
            args=config,
            train_dataset=dataset,
            processing_class=w.tok,
            optimizers=w.optimizers,
            callbacks=[clock],
        )
        setup_s = time.perf_counter() - w.t_setup
        trainer.train()
    n_steps = len(w.steps)
    if len(clock.ends) != n_steps:
        raise RuntimeError(f"{system} ran {len(clock.ends)} optimizer steps, expected {n_steps}")
    tokens, generate_s = w.counts["tokens"], w.counts["generate_s"]
    per_step = []
    prev = clock.t0
    for n, end in enumerate(clock.ends, start=1):
        gen = generate_s.get(n, 0.0)
        per_step.append(
            {
                "step": n,
                "tokens": tokens.get(n, 0),
                "generate_s": gen,
                "train_s": end - prev - gen,
                "step_s": end - prev,
            }
        )
        print(
            f"{system} step {n}/{n_steps}: {per_step[-1]['tokens']} tokens in {end - prev:.1f}s", flush=True
        )
        prev = end
    base = next(c for c in type(trainer).__mro__ if c.__module__.startswith("trl."))  # TRL's class, not ours
    write_result(
        spec,
        {
            "system": system,
            "trl_version": trl.__version__,
            "trainer": f"{base.__module__}.{base.__name__}",
            "steps": per_step,
            "setup_s": setup_s,
            "threads": torch.get_num_threads(),
            "sequences_per_micro_batch": spec["micro_batch"],
            **measured(per_step, spec["warmup_steps"]),
        },
    )
    return 0
