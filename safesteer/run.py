"""``python -m safesteer.run``: prepare -> distill -> evaluate -> export, in one run directory.

Hydra overrides select everything, e.g. ``python -m safesteer.run +experiment=smoke learner.zero_stage=3``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from safesteer.errors import SafeSteerError
from safesteer.paths import atomic_dir, atomic_write_json, atomic_write_text

log = logging.getLogger("safesteer")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def chat_prompts(
    cfg, tok, source: str, limit: int | None = None, what: str = "training"
) -> tuple[list[str], list[list[int]], int]:
    """Instructions of a prompt set and their chat-formatted ids; too-long prompts are skipped and counted."""
    from safesteer.core.steering import chat_texts
    from safesteer.data import load_prompts

    items = [p.instruction for p in load_prompts(source, limit=limit)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, items)]
    keep = [i for i, x in enumerate(ids) if len(x) <= cfg.model.max_prompt_tokens]
    skipped = len(items) - len(keep)
    if skipped:
        log.warning(
            "skipped %d %s prompts longer than model.max_prompt_tokens=%d",
            skipped,
            what,
            cfg.model.max_prompt_tokens,
        )
    return [items[i] for i in keep], [ids[i] for i in keep], skipped


def training_prompts(cfg, tok) -> tuple[list[str], list[list[int]], int]:
    """The harmful training instructions and their chat-formatted ids (too-long ones skipped, counted)."""
    return chat_prompts(cfg, tok, cfg.data.train, cfg.data.train_limit)


def anchor_prompts(cfg, tok) -> tuple[list[str], list[list[int]]]:
    """Harmless anchor prompts (scored by the original model), or none when unused."""
    if not cfg.data.anchor or not cfg.trainer.anchors_per_step:
        return [], []
    items, ids, _ = chat_prompts(cfg, tok, cfg.data.anchor, what="anchor")
    if not items:
        raise SafeSteerError(f"data.anchor={cfg.data.anchor}: no usable prompt")
    return items, ids


def export_model(run_dir: Path, model_path: str, blob: bytes, prepared) -> Path:
    """The trained student as an HF directory (safetensors, tokenizer, chat template), plus the teacher artifacts."""
    from transformers import AutoConfig, AutoTokenizer

    out = run_dir / "export"
    with atomic_dir(out) as tmp:
        model_dir = tmp / "model"
        model_dir.mkdir()
        AutoConfig.from_pretrained(model_path).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(model_dir)
        src = Path(model_path)
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", model_dir)
        (model_dir / "model.safetensors").write_bytes(blob)
        for p in (prepared.vector_path, prepared.tokens_path):
            if p is not None and Path(p).is_file():
                shutil.copy2(p, tmp / Path(p).name)
    return out / "model"


def _main(cfg) -> None:
    import ray
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from safesteer import checkpoint
    from safesteer import eval as ev
    from safesteer.actors import connect
    from safesteer.core.steering import load_vector
    from safesteer.core.tokens import SafetyTokens
    from safesteer.driver import Workers, distill, roles, schedule
    from safesteer.models import check_architecture, resolve_model_path
    from safesteer.report import table_rows, write_report
    from safesteer.steer import Prepared, prepare

    t_start = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not os.access(run_dir, os.W_OK):
        raise SafeSteerError(f"{run_dir}: output directory is not writable")
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    model_path = resolve_model_path(cfg.model.path)
    text_config = check_architecture(model_path, cfg.model.trust_remote_code)
    log.info("model: %s | run dir: %s", model_path, run_dir)

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    instructions, prompt_ids, skipped = training_prompts(cfg, tok)  # bad data fails here, before any work
    anchors = anchor_prompts(cfg, tok)
    steps = schedule(len(instructions), cfg, len(anchors[0]))
    stages = list(cfg.stages)
    resume = checkpoint.resolve(cfg.trainer.resume, run_dir) if "distill" in stages else None
    if resume is not None:  # the checkpoint carries the teacher artifacts the run trained with
        files = resume.state.get("files", {})
        prepared = Prepared(
            resume.file(files.get("vector")),
            resume.file(files.get("tokens")),
            resume.state.get("prepare", {}),
        )
        log.info("resuming from %s (step %d)", resume.path, resume.step)
    elif "prepare" in stages:
        prepared = prepare(cfg, run_dir, model_path)
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

    connect(dict(cfg.cluster), roles(cfg), {"TOKENIZERS_PARALLELISM": "false"})
    vector_blob = prepared.vector_path.read_bytes() if prepared.vector_path else None
    workers = Workers(cfg, model_path, vector_blob, st.ids, len(steps), device())
    workers.wait_ready()
    results: dict = {"tag": cfg.tag, "skipped_prompts": skipped, "steps": len(steps)}
    evaluate = "evaluate" in stages and cfg.eval.enabled
    try:
        if evaluate:
            sets = ev.eval_sets(cfg)
            before_ids = ev.generate_answers(workers.rollout[0], tok, sets, cfg.eval.max_new_tokens)
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
        )
        if evaluate:
            after_ids = ev.generate_answers(workers.rollout[0], tok, sets, cfg.eval.max_new_tokens)
        blob = workers.export("float32")
    finally:
        workers.shutdown()
        if cfg.cluster.address is None:
            ray.shutdown()
    # evaluation reads the trained weights from the export, so it is written for either stage
    exported = export_model(run_dir, model_path, blob, prepared) if "export" in stages or evaluate else None
    if evaluate:
        answers_path = run_dir / "answers.jsonl"
        results.update(
            ev.evaluate(cfg, model_path, str(exported), tok, before_ids, after_ids, sets, answers_path)
        )
    results["history"] = history
    results["wall_seconds"] = time.perf_counter() - t_start
    results["prepare"] = prepared.report
    atomic_write_json(run_dir / "metrics.json", results)
    write_report(run_dir, results, st)
    log.info("done in %.0fs; artifacts in %s", results["wall_seconds"], run_dir)
    for s, m, b, a in table_rows(results):
        print(f"{s:>22} {m:<34} {b:>8} -> {a}")


def main() -> None:
    from safesteer.config import hydra_entry

    hydra_entry(_main)


if __name__ == "__main__":
    main()
