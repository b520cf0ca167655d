"""``python -m safesteer.run``: prepare -> distill -> evaluate -> export, in one run directory.

Hydra overrides select everything, e.g. ``python -m safesteer.run +experiment=smoke learner.zero_stage=3``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from safesteer.cli import hydra_entry
from safesteer.errors import SafeSteerError
from safesteer.interrupts import STOP
from safesteer.paths import atomic_dir, atomic_write_json, atomic_write_text

log = logging.getLogger("safesteer")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def kept_prompts(cfg, tok, source, limit: int | None = None, what: str = "training"):
    """The prompts of a set (or list of sets) and their chat-formatted ids; prompts longer than
    ``model.max_prompt_tokens`` are skipped and counted. Returns (prompts, ids, skipped)."""
    from safesteer.core.generation import chat_texts
    from safesteer.data import load_sets

    prompts = load_sets(source, limit=limit)
    ids = [
        tok(t, add_special_tokens=False)["input_ids"]
        for t in chat_texts(tok, [p.instruction for p in prompts])
    ]
    keep = [i for i, x in enumerate(ids) if len(x) <= cfg.model.max_prompt_tokens]
    skipped = len(prompts) - len(keep)
    if skipped:
        log.warning(
            "skipped %d %s prompts longer than model.max_prompt_tokens=%d",
            skipped,
            what,
            cfg.model.max_prompt_tokens,
        )
    return [prompts[i] for i in keep], [ids[i] for i in keep], skipped


def chat_prompts(
    cfg, tok, source, limit: int | None = None, what: str = "training"
) -> tuple[list[str], list[list[int]], int]:
    """Instructions of a prompt set and their chat-formatted ids; too-long prompts are skipped and counted."""
    prompts, ids, skipped = kept_prompts(cfg, tok, source, limit, what)
    return [p.instruction for p in prompts], ids, skipped


def training_prompts(cfg, tok) -> tuple[list[str], list[list[int]], int]:
    """The harmful training instructions and their chat-formatted ids (too-long ones skipped, counted)."""
    return chat_prompts(cfg, tok, cfg.data.train, cfg.data.train_limit)


def anchor_pairs(train, anchors) -> dict[int, int]:
    """Training prompt index -> anchor index, for the pairs whose ``category`` names exactly one
    prompt on each side (the bundled harmful/benign question pairs share one category per pair)."""
    from collections import Counter

    nt, na = Counter(p.category for p in train), Counter(p.category for p in anchors)
    where = {p.category: j for j, p in enumerate(anchors) if p.category and na[p.category] == 1}
    return {i: where[p.category] for i, p in enumerate(train) if p.category in where and nt[p.category] == 1}


def anchor_prompts(cfg, tok, train=None) -> tuple[list[str], list[list[int]], dict[int, int]]:
    """Harmless anchor prompts (``data.anchor``: one set or a list), or none when unused, and (with
    ``trainer.pair_anchors`` and the training ``Prompt`` list) the training-to-anchor pairs."""
    if not cfg.data.anchor or not cfg.trainer.anchors_per_step:
        return [], [], {}
    prompts, ids, _ = kept_prompts(cfg, tok, cfg.data.anchor, what="anchor")
    if not prompts:
        raise SafeSteerError(f"data.anchor={cfg.data.anchor}: no usable prompt")
    pairs = anchor_pairs(train, prompts) if cfg.trainer.pair_anchors and train is not None else {}
    if cfg.trainer.pair_anchors and train is not None and not pairs:
        log.warning(
            "trainer.pair_anchors: no training prompt shares its category with exactly one anchor, so "
            "anchors follow the usual cycle (the bundled pairs: train_harmful_questions with "
            "anchor_benign_questions)"
        )
    return [p.instruction for p in prompts], ids, pairs


def make_selector(cfg, tok, run_dir: Path):
    """Validation and model selection during training (``trainer.select``)."""
    from safesteer.selection import Selector

    sel = cfg.trainer.select

    harmful, h_ids, _ = chat_prompts(cfg, tok, sel.harmful, what="selection")
    harmless, b_ids, _ = chat_prompts(cfg, tok, sel.harmless, what="selection")
    return Selector(run_dir, sel.every, h_ids, b_ids, sel.max_new_tokens)


def original_validation(cfg, model_path: str, selector, workers, tok) -> dict:
    """The selectivity scores of the original model (the engines' weights before training), cached
    for the same model, validation prompts, length and dtype."""
    import hashlib
    import json

    from safesteer.models import fingerprint
    from safesteer.paths import cache_dir

    blob = json.dumps(
        {
            "model": fingerprint(model_path),
            "prompts": [selector.harmful_ids, selector.harmless_ids],
            "max_new_tokens": selector.max_new_tokens,
            "dtype": workers.dtype,
            "version": 1,
        },
        sort_keys=True,
    )
    path = cache_dir() / "eval" / f"validation-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    scores = selector.score(workers.greedy, lambda ids: tok.decode(ids, skip_special_tokens=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, scores)
    return scores


def resumed_artifacts(resume, run_dir: Path):
    """The steering vector and safety tokens a checkpoint carries, copied into the run directory: later
    checkpoints copy them from there, and pruning may remove the checkpoint they came from."""
    from safesteer.paths import atomic_write_bytes
    from safesteer.prepare import Prepared

    files = resume.state.get("files", {})
    paths = []
    for key in ("vector", "tokens"):
        src = resume.file(files.get(key))
        dst = run_dir / src.name if src is not None else None
        if src is not None and src.resolve() != dst.resolve():
            atomic_write_bytes(dst, src.read_bytes())
        paths.append(dst)
    return Prepared(paths[0], paths[1], resume.state.get("prepare", {}))


def export_model(run_dir: Path, model_path: str, blob: bytes, prepared, adapter: dict | None = None) -> Path:
    """The trained student as an HF directory (safetensors, tokenizer, chat template), plus the teacher
    artifacts and, when LoRA trained, the adapter as peft writes it (``export/adapter``)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from safesteer.core.lora import is_factor_blob, peft_adapter
    from safesteer.models import check_export, merged_checkpoint, weight_names

    factors = is_factor_blob(blob)
    state = merged_checkpoint(model_path, blob) if factors else None  # LoRA: base + adapters
    check_export(model_path, set(state) if factors else weight_names(blob))
    out = run_dir / "export"
    with atomic_dir(out) as tmp:
        model_dir = tmp / "model"
        model_dir.mkdir()
        AutoConfig.from_pretrained(model_path).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(model_dir)
        src = Path(model_path)
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", model_dir)
        if factors:
            save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
            del state
        else:
            (model_dir / "model.safetensors").write_bytes(blob)
        for p in (prepared.vector_path, prepared.tokens_path):
            if p is not None and Path(p).is_file():
                shutil.copy2(p, tmp / Path(p).name)
        if adapter:  # peft's files, with the weights of the exported step
            (tmp / "adapter").mkdir()
            for name, data in adapter.items():
                (tmp / "adapter" / name).write_bytes(data)
            (tmp / "adapter" / "adapter_model.safetensors").write_bytes(peft_adapter(blob))
    return out / "model"


def _main(cfg) -> None:
    import ray
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from safesteer import checkpoint
    from safesteer import evaluate as ev
    from safesteer.cluster import cluster_check, connect
    from safesteer.core.steering import load_vector
    from safesteer.core.tokens import SafetyTokens
    from safesteer.driver import distill, schedule
    from safesteer.faults import workers_class
    from safesteer.models import check_architecture, load_tokenizer, resolve_model_path
    from safesteer.prepare import Prepared, prepare
    from safesteer.report import table_rows, write_report
    from safesteer.schema import typed
    from safesteer.workers import roles

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not os.access(run_dir, os.W_OK):
        raise SafeSteerError(f"{run_dir}: output directory is not writable")
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    model_path = resolve_model_path(cfg.model.path)
    text_config = check_architecture(model_path, cfg.model.trust_remote_code)
    log.info("model: %s | run dir: %s", model_path, run_dir)

    tok = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    train, prompt_ids, skipped = kept_prompts(
        cfg, tok, cfg.data.train, cfg.data.train_limit
    )  # bad data fails here
    instructions = [p.instruction for p in train]
    anchor_ins, anchor_ids, pairs = anchor_prompts(cfg, tok, train)
    anchors = (anchor_ins, anchor_ids)
    steps = schedule(len(instructions), cfg, len(anchor_ins), pairs)
    stages = list(cfg.stages)
    resume = checkpoint.resolve(cfg.trainer.resume, run_dir) if "distill" in stages else None
    if resume is not None:  # the checkpoint carries the teacher artifacts the run trained with
        prepared = resumed_artifacts(resume, run_dir)
        log.info("resuming from %s (step %d)", resume.path, resume.step)
    elif "prepare" in stages:
        STOP.at("prepare")
        t0 = time.perf_counter()
        prepared = prepare(cfg, run_dir, model_path)
        timings["prepare" + (" (cached)" if "cache" in prepared.report else "")] = time.perf_counter() - t0
    else:
        if not cfg.tokens.path or (cfg.teacher.kind == "vector" and not cfg.steering.vector):
            raise SafeSteerError(
                "stages without prepare need tokens.path (and steering.vector for teacher.kind=vector)"
            )
        prepared = Prepared(
            Path(cfg.steering.vector) if cfg.steering.vector else None, Path(cfg.tokens.path), {}
        )
    if prepared.vector_path is not None:  # given or resumed: it must fit this model
        load_vector(prepared.vector_path, text_config.hidden_size, text_config.num_hidden_layers)
    st = SafetyTokens.load(prepared.tokens_path, vocab_size=text_config.vocab_size)
    log.info("safety tokens (%s): %s", st.method, " ".join(repr(s) for s in st.strings[:20]))
    if "distill" not in stages:
        return

    t0 = time.perf_counter()
    STOP.at("start of the actors")
    vector_blob = prepared.vector_path.read_bytes() if prepared.vector_path else None
    results: dict = {"tag": cfg.tag, "skipped_prompts": skipped, "steps": len(steps)}
    evaluate = "evaluate" in stages and cfg.eval.enabled
    workers = None
    try:
        connect(typed(cfg.cluster), roles(cfg), {"TOKENIZERS_PARALLELISM": "false"})
        STOP.install()  # ray.init puts in handlers of its own (a stack dump on SIGTERM)
        STOP.watch(cluster_check())
        workers = workers_class()(cfg, model_path, vector_blob, st, len(steps), device())
        workers.wait_ready()
        timings["start actors"] = time.perf_counter() - t0
        if evaluate:
            STOP.at("evaluation of the original model")
            t0 = time.perf_counter()
            sets = ev.eval_sets(cfg)
            before_ids = ev.original_answers(
                cfg,
                model_path,
                sets,
                lambda: ev.generate_answers(workers.rollout[0], tok, sets, cfg.eval.max_new_tokens),
                workers.dtype,
            )
            timings["evaluate: original answers"] = time.perf_counter() - t0
        STOP.at("distill")
        t0 = time.perf_counter()
        selector = make_selector(cfg, tok, run_dir)
        # the original model on the validation prompts, for comparison (cached; a resumed run's
        # engines also start at the original weights)
        results["validation_original"] = original_validation(cfg, model_path, selector, workers, tok)
        history = distill(
            cfg,
            workers,
            tok,
            instructions,
            prompt_ids,
            run_dir,
            keep_files=[prepared.vector_path, prepared.tokens_path],
            resume=resume,
            extra_state={"prepare": prepared.report},
            anchors=anchors,
            pairs=pairs,
            selector=selector,
        )
        blob = workers.export("float32")
        adapter = workers.export_adapter() if cfg.learner.lora.r else None
        best = selector.best_weights()
        if best is not None and selector.best_step != len(steps):
            log.info(
                "model selection: step %d of %d is exported and evaluated", selector.best_step, len(steps)
            )
            blob = best
            workers.load_rollout_weights(best)
        results["selected_step"] = selector.best_step or len(steps)
        validated = [r for r in history if "selectivity" in r]  # the exported step's validation
        results["validation"] = next(
            (r for r in validated if r["step"] == results["selected_step"]),
            validated[-1] if validated else None,
        )
        timings["distill"] = time.perf_counter() - t0
        if evaluate:
            STOP.at("evaluation of the trained model")
            t0 = time.perf_counter()
            after_ids = ev.generate_answers(workers.rollout[0], tok, sets, cfg.eval.max_new_tokens)
            timings["evaluate: trained answers"] = time.perf_counter() - t0
    finally:
        if workers is not None:
            workers.shutdown()
        if cfg.cluster.address is None:
            ray.shutdown()
    # evaluation reads the trained weights from the export, so it is written for either stage
    STOP.at("export")
    t0 = time.perf_counter()
    exported = (
        export_model(run_dir, model_path, blob, prepared, adapter) if "export" in stages or evaluate else None
    )
    timings["export"] = time.perf_counter() - t0
    if evaluate:
        STOP.at("evaluation")
        t0 = time.perf_counter()
        answers_path = run_dir / "answers.jsonl"
        results.update(
            ev.evaluate(cfg, model_path, str(exported), tok, before_ids, after_ids, sets, answers_path)
        )
        timings["evaluate: judge, MMLU, KL"] = time.perf_counter() - t0
    results["timings"] = timings
    results["history"] = history
    results["wall_seconds"] = time.perf_counter() - t_start
    results["prepare"] = prepared.report
    atomic_write_json(run_dir / "metrics.json", results)
    write_report(run_dir, results, st)
    log.info("done in %.0fs; artifacts in %s", results["wall_seconds"], run_dir)
    for s, m, b, a in table_rows(results):
        if m != "degenerate":
            print(f"{s:>24} {m:<34} {b:>8} -> {a}")
    if "bar" in results:
        missed = [k for k, x in results["bar"]["items"].items() if not x["ok"]]
        print(
            f"the bar: {'met' if not missed else 'missed (' + ', '.join(missed) + ')'}; report: {run_dir / 'report.md'}"
        )


def main() -> None:
    hydra_entry(_main)


if __name__ == "__main__":
    main()
