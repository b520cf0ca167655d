"""``python -m safesteer.run``: prepare -> distill -> evaluate -> export, in one run directory.

Hydra overrides select everything, e.g. ``python -m safesteer.run +experiment=smoke learner.zero_stage=3``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from safesteer import checkpoint
from safesteer import evaluate as evaluation
from safesteer.cli import hydra_entry
from safesteer.cluster import cluster_check, connect
from safesteer.core.lora import is_factor_blob, peft_adapter
from safesteer.core.steering import load_vector
from safesteer.core.tokens import SafetyTokens
from safesteer.data.training import TrainingData
from safesteer.driver import Checkpoints, distill
from safesteer.errors import SafeSteerError
from safesteer.faults import workers_class
from safesteer.interrupts import STOP
from safesteer.metrics import Stopwatch
from safesteer.models import (
    check_architecture,
    check_export,
    default_device,
    fingerprint,
    load_tokenizer,
    merged_checkpoint,
    resolve_model_path,
    weight_names,
)
from safesteer.paths import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, cache_dir
from safesteer.prepare import Prepared, prepare
from safesteer.report import table_rows, write_report
from safesteer.schema import typed
from safesteer.selection import Selector
from safesteer.workers import Workers, roles

log = logging.getLogger("safesteer")


def resumed_artifacts(resume: checkpoint.Checkpoint, run_dir: Path) -> Prepared:
    """The steering vector and safety tokens a checkpoint carries, copied into the run directory: later
    checkpoints copy them from there, and pruning may remove the checkpoint they came from."""
    files = resume.state.get("files", {})
    paths = []
    for key in ("vector", "tokens"):
        src = resume.file(files.get(key))
        dst = run_dir / src.name if src is not None else None
        if src is not None and src.resolve() != dst.resolve():
            atomic_write_bytes(dst, src.read_bytes())
        paths.append(dst)
    return Prepared(paths[0], paths[1], resume.state.get("prepare", {}))


def export_model(
    run_dir: Path, model_path: str, blob: bytes, prepared: Prepared, adapter: dict | None = None
) -> Path:
    """The trained student as an HF directory (safetensors, tokenizer, chat template), plus the teacher
    artifacts and, when LoRA trained, the adapter as peft writes it (``export/adapter``)."""
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


@dataclass
class Run:
    """One run: its config and directory, the model, the training data, and what the stages produce."""

    cfg: Any
    run_dir: Path
    model_path: str
    text_config: Any  # the model's (text) config: hidden size, layers, vocabulary
    tok: Any
    data: TrainingData
    results: dict  # metrics.json
    timings: Stopwatch = field(default_factory=Stopwatch)

    @property
    def evaluating(self) -> bool:
        return "evaluate" in self.cfg.stages and self.cfg.eval.enabled

    @contextmanager
    def stage(self, name: str):
        """A stage: named for a stop's message, and timed for the report."""
        STOP.at(name)
        with self.timings(name):
            yield


@dataclass
class Trained:
    """What the worker groups leave: the exported step's weights and the answers before and after."""

    blob: bytes  # safetensors weights, or LoRA factors
    adapter: dict[str, bytes] | None  # peft's files, when LoRA trained
    history: list[dict]
    before: dict | None = None  # the evaluation sets' answer ids of the original model
    after: dict | None = None  # ... and of the trained one


def resolve(cfg) -> Run:
    """The model, its tokenizer and the training data (bad data fails here, before anything starts)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not os.access(run_dir, os.W_OK):
        raise SafeSteerError(f"{run_dir}: output directory is not writable")
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    model_path = resolve_model_path(cfg.model.path)
    text_config = check_architecture(model_path, cfg.model.trust_remote_code)
    log.info("model: %s | run dir: %s", model_path, run_dir)
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    data = TrainingData.build(cfg, tok)
    results = {"tag": cfg.tag, "skipped_prompts": data.skipped, "steps": len(data.plan)}
    return Run(cfg, run_dir, model_path, text_config, tok, data, results)


def teacher_files(run: Run) -> tuple[Prepared, checkpoint.Checkpoint | None]:
    """The steering vector and safety tokens: from the checkpoint a run resumes, from the prepare
    stage, or given (``steering.vector``, ``tokens.path``); checked against the model."""
    cfg = run.cfg
    resume = checkpoint.resolve(cfg.trainer.resume, run.run_dir) if "distill" in cfg.stages else None
    if resume is not None:  # the checkpoint carries the teacher artifacts the run trained with
        prepared = resumed_artifacts(resume, run.run_dir)
        log.info("resuming from %s (step %d)", resume.path, resume.step)
    elif "prepare" in cfg.stages:
        with run.stage("prepare"):
            prepared = prepare(cfg, run.run_dir, run.model_path)
        if "cache" in prepared.report:
            run.timings["prepare (cached)"] = run.timings.pop("prepare")
    elif not cfg.tokens.path or (cfg.teacher.kind == "vector" and not cfg.steering.vector):
        raise SafeSteerError(
            "stages without prepare need tokens.path (and steering.vector for teacher.kind=vector)"
        )
    else:
        vector = Path(cfg.steering.vector) if cfg.steering.vector else None
        prepared = Prepared(vector, Path(cfg.tokens.path), {})
    c = run.text_config
    if prepared.vector_path is not None:  # given or resumed: it must fit this model
        load_vector(prepared.vector_path, c.hidden_size, c.num_hidden_layers)
    return prepared, resume


def start_workers(run: Run, prepared: Prepared, safety: SafetyTokens) -> Workers:
    """Ray, then the rollout workers, the teachers and the learner ranks, ready."""
    connect(typed(run.cfg.cluster), roles(run.cfg), {"TOKENIZERS_PARALLELISM": "false"})
    STOP.install()  # ray.init puts in handlers of its own (a stack dump on SIGTERM)
    STOP.watch(cluster_check())
    vector = prepared.vector_path.read_bytes() if prepared.vector_path else None
    workers = workers_class()(run.cfg, run.model_path, vector, safety, len(run.data.plan), default_device())
    workers.wait_ready()
    return workers


def original_answers(run: Run, workers: Workers) -> dict:
    """The original model's answers to the evaluation sets (cached for the same model and sets)."""
    cfg, sets = run.cfg, evaluation.eval_sets(run.cfg)
    answer = lambda: evaluation.generate_answers(workers.rollout[0], run.tok, sets, cfg.eval.max_new_tokens)  # noqa: E731
    return evaluation.original_answers(cfg, run.model_path, sets, answer, workers.dtype)


def original_validation(run: Run, selector: Selector, workers: Workers) -> dict:
    """The selectivity scores of the original model (the engines' weights before training), cached
    for the same model, validation prompts, length and dtype."""
    blob = json.dumps(
        {
            "model": fingerprint(run.model_path),
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
    scores = selector.score(workers.greedy)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, scores)
    return scores


def distill_and_select(run: Run, workers: Workers, prepared: Prepared, resume) -> Trained:
    """Distillation, then model selection: the most selective validated step is exported."""
    cfg, steps = run.cfg, len(run.data.plan)
    selector = Selector.build(cfg, run.tok, run.run_dir)
    # the original model on the validation prompts, for comparison (a resumed run's engines also
    # start at the original weights)
    run.results["validation_original"] = original_validation(run, selector, workers)
    ckpts = Checkpoints(run.run_dir, cfg, run.data.plan, prepared)
    history = distill(cfg, workers, run.data, ckpts, selector, resume)
    trained = Trained(
        workers.export("float32"), workers.export_adapter() if cfg.learner.lora.r else None, history
    )
    best = selector.best_weights()
    if best is not None and selector.best_step != steps:
        log.info("model selection: step %d of %d is exported and evaluated", selector.best_step, steps)
        trained.blob = best
        workers.load_rollout_weights(best)
    selected = run.results["selected_step"] = selector.best_step or steps
    validated = [r for r in history if "selectivity" in r]  # the exported step's validation
    run.results["validation"] = next(
        (r for r in validated if r["step"] == selected), validated[-1] if validated else None
    )
    return trained


def with_workers(run: Run, prepared: Prepared, safety: SafetyTokens, resume) -> Trained:
    """The stages that need the worker groups: the original model's answers, distillation and model
    selection, the trained model's answers. The groups are shut down whatever happens."""
    workers = None
    try:
        with run.stage("start of the actors"):
            workers = start_workers(run, prepared, safety)
        before = None
        if run.evaluating:
            with run.stage("evaluation of the original model"):
                before = original_answers(run, workers)
        with run.stage("distill"):
            trained = distill_and_select(run, workers, prepared, resume)
        trained.before = before
        if run.evaluating:
            with run.stage("evaluation of the trained model"):
                sets = evaluation.eval_sets(run.cfg)
                trained.after = evaluation.generate_answers(
                    workers.rollout[0], run.tok, sets, run.cfg.eval.max_new_tokens
                )
        return trained
    finally:
        if workers is not None:
            workers.shutdown()
        if run.cfg.cluster.address is None:
            ray.shutdown()


def evaluate(run: Run, trained: Trained, exported: Path) -> None:
    """The judge, MMLU, KL and perplexity on the answers before and after (answers.jsonl)."""
    with run.stage("evaluation"):
        sets = evaluation.eval_sets(run.cfg)
        scores = evaluation.evaluate(run.cfg, run.model_path, str(exported), run.tok, trained.before, trained.after, sets,
                             run.run_dir / "answers.jsonl")  # fmt: skip
    run.results.update(scores)


def report(run: Run, trained: Trained, prepared: Prepared, safety: SafetyTokens, t_start: float) -> None:
    """metrics.json, report.md/html, and the summary table on the terminal."""
    results = run.results
    results.update(timings=dict(run.timings), history=trained.history, prepare=prepared.report)
    results["wall_seconds"] = time.perf_counter() - t_start
    atomic_write_json(run.run_dir / "metrics.json", results)
    write_report(run.run_dir, results, safety)
    log.info("done in %.0fs; artifacts in %s", results["wall_seconds"], run.run_dir)
    for s, m, b, a in table_rows(results):
        if m != "degenerate":
            print(f"{s:>24} {m:<34} {b:>8} -> {a}")
    if "bar" in results:
        missed = [k for k, x in results["bar"]["items"].items() if not x["ok"]]
        verdict = "met" if not missed else "missed (" + ", ".join(missed) + ")"
        print(f"the bar: {verdict}; report: {run.run_dir / 'report.md'}")


def _main(cfg) -> None:
    """The recipe: resolve -> prepare (or resume) -> [workers: evaluate the original, distill, select,
    answer] -> export -> evaluate -> report."""
    t_start = time.perf_counter()
    run = resolve(cfg)
    prepared, resume = teacher_files(run)
    safety = SafetyTokens.load(prepared.tokens_path, vocab_size=run.text_config.vocab_size)
    log.info("safety tokens (%s): %s", safety.method, " ".join(repr(s) for s in safety.strings[:20]))
    if "distill" not in cfg.stages:
        return
    trained = with_workers(run, prepared, safety, resume)
    exported = None
    if "export" in cfg.stages or run.evaluating:  # evaluation reads the trained weights from the export
        with run.stage("export"):
            exported = export_model(run.run_dir, run.model_path, trained.blob, prepared, trained.adapter)
    if run.evaluating:
        evaluate(run, trained, exported)
    report(run, trained, prepared, safety, t_start)


def main() -> None:
    hydra_entry(_main)


if __name__ == "__main__":
    main()
