"""Hydra entry points and config validation: bad values fail at start with one line."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from safesteer.errors import SafeSteerError, one_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("prepare", "distill", "evaluate", "export")


def _check(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise SafeSteerError(f"{key}={value}: {why}")


def _is_number(value, integer: bool) -> bool:
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


def _number(cfg, key: str, *, integer: bool = False, null: bool = False):
    """The value of a numeric option. Anything else (``learner.lr=abc``, ``trainer.epochs=1.5``) fails
    here, naming the option, instead of as a TypeError in the first comparison or deep in a stage."""
    value = OmegaConf.select(cfg, key)
    if value is None and null:
        return None
    _check(
        _is_number(value, integer),
        key,
        value,
        ("must be an integer" if integer else "must be a number") + (" or null" if null else ""),
    )
    return value


def _at_least(cfg, key: str, low, *, integer: bool = True, null: bool = False, why: str = "") -> None:
    value = _number(cfg, key, integer=integer, null=null)
    _check(value is None or value >= low, key, value, why or f"must be >= {low}")


def _positive(cfg, key: str, *, null: bool = False, why: str = "must be > 0") -> None:
    value = _number(cfg, key, null=null)
    _check(value is None or value > 0, key, value, why)


def _fraction(cfg, key: str, *, closed: str = "[]", null: bool = False) -> None:
    """A number in [0, 1]; ``closed`` names the included ends, e.g. "[)" for [0, 1), "(]" for (0, 1]."""
    value = _number(cfg, key, null=null)
    if value is not None:
        low_ok = value >= 0 if closed[0] == "[" else value > 0
        high_ok = value <= 1 if closed[1] == "]" else value < 1
        _check(low_ok and high_ok, key, value, f"must be in {closed[0]}0, 1{closed[1]}")


def _numbers(cfg, key: str, *, integer: bool = False, null: bool = False) -> list | None:
    value = OmegaConf.select(cfg, key)
    if value is None and null:
        return None
    what = "integers" if integer else "numbers"
    _check(
        OmegaConf.is_list(value) and all(_is_number(v, integer) for v in value),
        key,
        value,
        f"must be a list of {what}" + (" or null" if null else ""),
    )
    return list(value)


def sequences_per_step(cfg) -> int:
    """Sequences in one optimizer step: (training prompts + anchor prompts) x samples per prompt."""
    t = cfg.trainer
    anchors = t.anchors_per_step if cfg.data.anchor else 0
    return (t.prompts_per_step + anchors) * cfg.rollout.samples_per_prompt


def validate(cfg) -> None:
    """Check the resolved config; raise SafeSteerError naming the first bad value."""
    from safesteer.core.loss import MODES
    from safesteer.core.steering import METHODS, POSITIONS, TEACHER_KINDS
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
    _number(cfg, "seed", integer=True)
    _at_least(cfg, "model.max_prompt_tokens", 1)
    _at_least(cfg, "data.train_limit", 1, null=True)

    _check(
        cfg.teacher.kind in TEACHER_KINDS,
        "teacher.kind",
        cfg.teacher.kind,
        f"choose one of {', '.join(TEACHER_KINDS)}",
    )
    for key in ("num_actors", "chunk_size", "batch_size", "threads"):
        _at_least(cfg, f"teacher.{key}", 1)
    _number(cfg, "teacher.anchor_coeff")
    _number(cfg, "teacher.coeff", null=True)
    _at_least(cfg, "tokens.contrast_weight", 0, integer=False)
    _check(cfg.teacher.gate in ("label", "probe"), "teacher.gate", cfg.teacher.gate, "choose label or probe")
    _check(
        cfg.teacher.gate == "label" or cfg.teacher.kind == "vector",
        "teacher.gate",
        cfg.teacher.gate,
        "the harm probe gates a steering vector (teacher.kind=vector)",
    )
    probe_layers = _numbers(cfg, "probe.layers", integer=True)
    _check(len(probe_layers) > 0, "probe.layers", probe_layers, "needs at least one layer")
    _at_least(cfg, "probe.batch_size", 1)

    sm = list(cfg.steering.methods)
    _check(
        bool(sm) and all(m in METHODS for m in sm),
        "steering.methods",
        sm,
        f"choose from {', '.join(METHODS)}",
    )
    _numbers(cfg, "steering.layers", integer=True, null=True)
    _check(
        cfg.teacher.positions in POSITIONS,
        "teacher.positions",
        cfg.teacher.positions,
        f"choose one of {', '.join(POSITIONS)}",
    )
    coeffs = _numbers(cfg, "steering.coeffs")
    _check(len(coeffs) > 0, "steering.coeffs", coeffs, "needs at least one coefficient")
    for key in ("n_train", "n_val", "top_candidates", "max_new_tokens", "batch_size"):
        _at_least(cfg, f"steering.{key}", 1)
    _fraction(cfg, "steering.prune_fraction", closed="[)")
    _fraction(cfg, "steering.max_degenerate")
    _fraction(cfg, "steering.max_benign_refusal")
    _number(cfg, "steering.max_kl", null=True)
    _number(cfg, "steering.min_steering_score", null=True)

    _check(
        cfg.tokens.method in TOKEN_METHODS,
        "tokens.method",
        cfg.tokens.method,
        f"choose one of {', '.join(TOKEN_METHODS)}",
    )
    for key in ("k", "horizon", "samples_per_prompt", "n_prompts", "vote_top", "batch_size"):
        _at_least(cfg, f"tokens.{key}", 1)
    _positive(cfg, "tokens.temperature")
    _fraction(cfg, "tokens.top_p", closed="(]")
    _at_least(cfg, "tokens.min_steered_prob", 0, integer=False)
    _at_least(cfg, "tokens.min_student_mass", 0, integer=False)

    r = cfg.rollout
    for key in ("num_workers", "samples_per_prompt", "max_new_tokens", "tensor_parallel_size", "threads"):
        _at_least(cfg, f"rollout.{key}", 1)
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
    _positive(cfg, "rollout.temperature", why="must be > 0 (sampling is on-policy)")
    _fraction(cfg, "rollout.top_p", closed="(]")
    _fraction(cfg, "rollout.gpu_memory_utilization", closed="(]")
    _positive(cfg, "rollout.kv_cache_gb")
    _at_least(cfg, "rollout.max_model_len", r.max_new_tokens + 1, why="must exceed rollout.max_new_tokens")

    for group in ("rollout", "teacher", "learner"):
        _at_least(cfg, f"{group}.num_cpus", 0, integer=False)
        _at_least(cfg, f"{group}.num_gpus", 0, integer=False)

    ln = cfg.learner
    _check(ln.loss in MODES, "learner.loss", ln.loss, f"choose one of {', '.join(MODES)}")
    _check(
        not (ln.renormalize and ln.loss == "bucket"),
        "learner.renormalize",
        ln.renormalize,
        "cannot be combined with learner.loss=bucket",
    )
    _check(ln.zero_stage in (0, 1, 2, 3), "learner.zero_stage", ln.zero_stage, "must be 0, 1, 2 or 3")
    for key in ("world_size", "micro_batch_size", "topk", "threads"):
        _at_least(cfg, f"learner.{key}", 1)
    _positive(cfg, "learner.lr")
    _at_least(cfg, "learner.train_from_layer", 0, null=True)
    _at_least(cfg, "learner.weight_decay", 0, integer=False)
    _positive(cfg, "learner.grad_clip")
    betas = _numbers(cfg, "learner.betas")
    _check(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        "learner.betas",
        betas,
        "must be two numbers in [0, 1)",
    )
    _check(ln.bf16 in (True, False, "auto"), "learner.bf16", ln.bf16, "choose true, false or auto")
    _check(
        cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
        "model.dtype",
        cfg.model.dtype,
        "choose auto, float32, bfloat16 or float16",
    )
    _fraction(cfg, "learner.warmup_ratio", closed="[)")

    for key in ("max_prompts", "n_mmlu"):
        _at_least(cfg, f"eval.{key}", 1, null=True)
    _at_least(cfg, "eval.max_new_tokens", 1)
    ev = cfg.eval
    named = [*ev.harmful_sets, *ev.benign_sets, *ev.edgy_sets]
    twice = sorted({n for n in named if named.count(n) > 1})
    _check(not twice, "eval.harmful_sets/benign_sets/edgy_sets", twice, "a set may be in one group only")
    _check(len(ev.harmful_sets) > 0, "eval.harmful_sets", list(ev.harmful_sets), "needs at least one set")
    _check(
        ev.capability_set in named,
        "eval.capability_set",
        ev.capability_set,
        "must be one of the evaluation sets (eval.benign_sets)",
    )
    _check(ev.mmlu_form in ("cloze", "letter"), "eval.mmlu_form", ev.mmlu_form, "choose cloze or letter")
    for key in ("harmful_refusal", "benign_increase", "edgy_increase", "degenerate"):
        _fraction(cfg, f"eval.bar.{key}")
    _at_least(cfg, "eval.classifier.max_new_tokens", 1)
    _at_least(cfg, "eval.classifier.max_model_len", 2)
    _check(
        cfg.eval.classifier.template in ("llamaguard", "harmbench"),
        "eval.classifier.template",
        cfg.eval.classifier.template,
        "choose llamaguard or harmbench",
    )

    t = cfg.trainer
    _check(t.max_staleness in (0, 1), "trainer.max_staleness", t.max_staleness, "must be 0 (on-policy) or 1")
    _at_least(cfg, "trainer.prompts_per_step", 1)
    _at_least(cfg, "trainer.epochs", 1)
    _at_least(cfg, "trainer.max_steps", 1, null=True)
    _at_least(cfg, "trainer.checkpoint_every", 0, why="must be >= 0 (0 = never)")
    _at_least(cfg, "trainer.keep_checkpoints", 1)
    _at_least(cfg, "trainer.max_restarts", 0)
    _at_least(cfg, "trainer.max_bad_steps", 1)
    _check(
        t.resume is None or (isinstance(t.resume, str) and t.resume.strip() != ""),
        "trainer.resume",
        t.resume,
        "must be null, auto or a checkpoint path",
    )
    _at_least(cfg, "trainer.anchors_per_step", 0)
    _at_least(cfg, "trainer.select.every", 0)
    _at_least(cfg, "trainer.select.max_new_tokens", 1)
    _at_least(cfg, "trainer.anchor_weight", 0, integer=False)
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
    _positive(cfg, "cluster.num_cpus", null=True)
    _positive(cfg, "cluster.placement_timeout_s")


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


def _remove_if_only_bookkeeping(run_dir: Path) -> None:
    """A run refused at validation leaves no directory behind when Hydra's own files (``.hydra/`` and an
    empty job log) are all it holds; a directory with anything else in it is left exactly as it was."""
    try:
        entries = list(run_dir.iterdir())
        if not all(
            (e.name == ".hydra" and e.is_dir()) or (e.suffix == ".log" and e.stat().st_size == 0)
            for e in entries
        ):
            return
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        for e in entries:
            if e.suffix == ".log":
                e.unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError:
        pass


def hydra_entry(fn: Callable, config_name: str = "config") -> None:
    """Run ``fn(cfg)`` under Hydra with validation and one-line errors (tracebacks with debug=true)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

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
            try:
                validate(cfg)
            except SafeSteerError:
                _remove_if_only_bookkeeping(Path(HydraConfig.get().runtime.output_dir))
                raise
            fn(cfg)
        except (SafeSteerError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
            if debug:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)

    _app()
