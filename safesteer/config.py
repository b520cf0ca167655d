"""Hydra entry points and config validation: bad values fail at start with one line."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from safesteer.errors import SafeSteerError, one_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("prepare", "distill", "evaluate", "export")


def _check(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise SafeSteerError(f"{key}={value}: {why}")


def sequences_per_step(cfg) -> int:
    """Sequences in one optimizer step: (training prompts + anchor prompts) x samples per prompt."""
    t = cfg.trainer
    anchors = t.anchors_per_step if cfg.data.anchor else 0
    return (t.prompts_per_step + anchors) * cfg.rollout.samples_per_prompt


def validate(cfg) -> None:
    """Check the resolved config; raise SafeSteerError naming the first bad value."""
    from safesteer.core.loss import MODES
    from safesteer.core.steering import METHODS, TEACHER_KINDS
    from safesteer.core.tokens import TOKEN_METHODS

    stages = list(cfg.stages)
    _check(
        all(s in STAGES for s in stages), "stages", stages, f"each stage must be one of {', '.join(STAGES)}"
    )
    _check(
        stages == [s for s in STAGES if s in stages],
        "stages",
        stages,
        f"stages run in the order {', '.join(STAGES)}",
    )
    _check(
        cfg.teacher.kind in TEACHER_KINDS,
        "teacher.kind",
        cfg.teacher.kind,
        f"choose one of {', '.join(TEACHER_KINDS)}",
    )
    _check(cfg.teacher.num_actors >= 1, "teacher.num_actors", cfg.teacher.num_actors, "must be >= 1")
    _check(cfg.teacher.chunk_size >= 1, "teacher.chunk_size", cfg.teacher.chunk_size, "must be >= 1")
    sm = list(cfg.steering.methods)
    _check(
        bool(sm) and all(m in METHODS for m in sm),
        "steering.methods",
        sm,
        f"choose from {', '.join(METHODS)}",
    )
    _check(
        len(cfg.steering.coeffs) > 0,
        "steering.coeffs",
        list(cfg.steering.coeffs),
        "needs at least one coefficient",
    )
    _check(
        0 <= cfg.steering.prune_fraction < 1,
        "steering.prune_fraction",
        cfg.steering.prune_fraction,
        "must be in [0, 1)",
    )
    _check(
        cfg.tokens.method in TOKEN_METHODS,
        "tokens.method",
        cfg.tokens.method,
        f"choose one of {', '.join(TOKEN_METHODS)}",
    )
    for key in ("k", "horizon", "samples_per_prompt", "n_prompts"):
        _check(cfg.tokens[key] >= 1, f"tokens.{key}", cfg.tokens[key], "must be >= 1")
    r = cfg.rollout
    _check(r.num_workers >= 1, "rollout.num_workers", r.num_workers, "must be >= 1")
    _check(
        r.weight_sync in ("object_store", "nccl"),
        "rollout.weight_sync",
        r.weight_sync,
        "choose object_store or nccl",
    )
    if r.weight_sync == "nccl":
        import torch

        _check(
            torch.cuda.is_available(),
            "rollout.weight_sync",
            r.weight_sync,
            "needs CUDA GPUs (use object_store)",
        )
    _check(r.samples_per_prompt >= 1, "rollout.samples_per_prompt", r.samples_per_prompt, "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "must be > 0 (sampling is on-policy)")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _check(
        r.max_model_len > r.max_new_tokens,
        "rollout.max_model_len",
        r.max_model_len,
        "must exceed rollout.max_new_tokens",
    )
    ln = cfg.learner
    _check(ln.loss in MODES, "learner.loss", ln.loss, f"choose one of {', '.join(MODES)}")
    _check(
        not (ln.renormalize and ln.loss == "bucket"),
        "learner.renormalize",
        ln.renormalize,
        "cannot be combined with learner.loss=bucket",
    )
    _check(ln.zero_stage in (0, 1, 2, 3), "learner.zero_stage", ln.zero_stage, "must be 0, 1, 2 or 3")
    _check(ln.world_size >= 1, "learner.world_size", ln.world_size, "must be >= 1")
    _check(ln.micro_batch_size >= 1, "learner.micro_batch_size", ln.micro_batch_size, "must be >= 1")
    _check(ln.lr > 0, "learner.lr", ln.lr, "must be > 0")
    _check(ln.bf16 in (True, False, "auto"), "learner.bf16", ln.bf16, "choose true, false or auto")
    _check(
        cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
        "model.dtype",
        cfg.model.dtype,
        "choose auto, float32, bfloat16 or float16",
    )
    _check(0 <= ln.warmup_ratio < 1, "learner.warmup_ratio", ln.warmup_ratio, "must be in [0, 1)")
    _check(
        cfg.eval.classifier.template in ("llamaguard", "harmbench"),
        "eval.classifier.template",
        cfg.eval.classifier.template,
        "choose llamaguard or harmbench",
    )
    t = cfg.trainer
    _check(t.max_staleness in (0, 1), "trainer.max_staleness", t.max_staleness, "must be 0 (on-policy) or 1")
    _check(t.prompts_per_step >= 1, "trainer.prompts_per_step", t.prompts_per_step, "must be >= 1")
    _check(t.epochs >= 1, "trainer.epochs", t.epochs, "must be >= 1")
    _check(
        t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, "must be >= 0 (0 = never)"
    )
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.max_restarts >= 0, "trainer.max_restarts", t.max_restarts, "must be >= 0")
    _check(t.max_bad_steps >= 1, "trainer.max_bad_steps", t.max_bad_steps, "must be >= 1")
    _check(
        t.resume is None or (isinstance(t.resume, str) and t.resume.strip() != ""),
        "trainer.resume",
        t.resume,
        "must be null, auto or a checkpoint path",
    )
    _check(t.anchors_per_step >= 0, "trainer.anchors_per_step", t.anchors_per_step, "must be >= 0")
    _check(t.anchor_weight >= 0, "trainer.anchor_weight", t.anchor_weight, "must be >= 0")
    seqs = sequences_per_step(cfg)
    _check(
        seqs % (ln.world_size * ln.micro_batch_size) == 0,
        "learner.micro_batch_size",
        ln.micro_batch_size,
        f"(trainer.prompts_per_step + trainer.anchors_per_step) x rollout.samples_per_prompt = {seqs} "
        "sequences per step must split evenly "
        f"over learner.world_size={ln.world_size} ranks x micro-batches of {ln.micro_batch_size}",
    )
    _check(
        cfg.cluster.strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        "cluster.strategy",
        cfg.cluster.strategy,
        "choose PACK, SPREAD, STRICT_PACK or STRICT_SPREAD",
    )
    _check(
        cfg.cluster.placement_timeout_s > 0,
        "cluster.placement_timeout_s",
        cfg.cluster.placement_timeout_s,
        "must be > 0",
    )


def _unwritable_output_dir(argv: list[str]) -> str | None:
    """Check, before Hydra creates it, that the run directory can be written (Hydra would fail with a
    traceback). Interpolations like ``${now:...}`` are checked up to their first literal directory."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in argv if a.startswith(key)]
    raw = given[-1] if given else ("multirun" if multirun else "outputs")
    literal = raw.split("${", 1)[0]
    target = (
        Path(literal) if not literal or literal.endswith("/") or "${" not in raw else Path(literal).parent
    )
    target = target if str(target) else Path(".")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".safesteer-write-test-"):
            pass
    except OSError as e:
        return f"{key}{raw}: output directory is not writable ({e.strerror or e}: {e.filename or target})"
    return None


def hydra_entry(fn: Callable, config_name: str = "config") -> None:
    """Run ``fn(cfg)`` under Hydra with validation and one-line errors (tracebacks with debug=true)."""
    import hydra

    if not CONF_DIR.is_dir():
        print(
            f"error: config directory {CONF_DIR} not found (install the project with `pip install -e .`)",
            file=sys.stderr,
        )
        sys.exit(2)

    problem = _unwritable_output_dir(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def _app(cfg) -> None:
        debug = bool(cfg.get("debug", False)) or bool(os.environ.get("SAFESTEER_DEBUG"))
        try:
            validate(cfg)
            fn(cfg)
        except (SafeSteerError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
            if debug:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)

    _app()
