"""``python -m safesteer.compare``: SafeSteer against what a user would try instead, on one frontier.

Every method starts from the same student, the same harmful training prompts (and, where the run uses
them, the same harmless anchors) and the same steered teacher, built once by the prepare stage:

- ``safesteer``: the run itself (``python -m safesteer.run``), swept over run overrides (e.g.
  ``trainer.max_steps``); ``full_vocab`` is the same with ``learner.loss=full`` (the exact reverse KL
  over the whole vocabulary instead of the safety tokens).
- ``sft``: supervised fine-tuning on the teacher's own greedy refusals (anchors: the original model's
  own answers), TRL's ``SFTTrainer``; swept over ``lr`` x ``epochs``.
- ``dpo``: chosen = the teacher's refusal, rejected = the original model's answer (anchors: the
  reverse), TRL's ``DPOTrainer`` with the original model as reference; swept over ``beta``.
- ``distill``: on-policy reverse KL over the whole vocabulary to the same teacher (steered as the
  run's teacher steers, per prompt and position) with TRL's ``DistillationTrainer``, on the run's own
  plan; swept over ``lr``.
- no training (:mod:`safesteer.inference`): ``steered``, the teacher itself served as the model (the
  activation-steering baseline), swept over the vector's ``coeff``; ``gated``, the same vector on the
  prompts the harm probe flags only (conditional steering); ``system_prompt``, the original model
  with a safety system prompt (``prompt``; null: the built-in one). Their cost is at inference: the
  table gives generation tokens/s with and without the hook or prompt.

Each sweep point is validated on the validation prompts of ``trainer.select`` (the selectivity the
run's model selection uses) and evaluated on the held-out evaluation sets (``compare.evaluate=chosen``:
only each method's chosen point); each method's point is **chosen on validation only**. Results are
reused when a point's directory already holds them (its name carries a hash of everything that
defines it), so an interrupted comparison resumes. Written:
``compare.json``, ``compare.md`` (the table of the chosen points) and ``frontier.png`` (harmful
refusal against over-refusal, MMLU as colour, one curve per method over its sweep).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from safesteer import baselines, inference
from safesteer.core.steering import SAFETY_SYSTEM_PROMPT, decoder_layers, load_vector
from safesteer.data.training import chat_prompts
from safesteer.errors import SafeSteerError
from safesteer.interrupts import STOP
from safesteer.models import compute_dtype, default_device, load_hf, load_tokenizer, resolve_model_path
from safesteer.paths import atomic_write_json, atomic_write_text
from safesteer.prepare import Prepared, build_probe, prepare
from safesteer.report import markdown_page, percent
from safesteer.rollout import RolloutWorker
from safesteer.schema import option, require, typed
from safesteer.selection import Selector, selectivity

log = logging.getLogger(__name__)

TRAINED = {"sft": ("lr", "epochs"), "dpo": ("beta", "lr", "epochs"), "distill": ("lr",)}  # with TRL
DEPLOYED = {"steered": ("coeff",), "gated": ("coeff",), "system_prompt": ("prompt",)}  # no training
KNOBS = {**TRAINED, **DEPLOYED}  # the run methods (safesteer, full_vocab) take run overrides
METHODS = ("safesteer", "full_vocab", *KNOBS)


@dataclass
class CompareConfig:
    """``compare``: which methods ``python -m safesteer.compare`` runs, and each one's sweep (conf/compare)."""

    methods: list[str] = option(default=[])
    sweeps: Any = option()  # method -> {knob or run override: [values]}; the points are the product
    answer_tokens: int = option(ge=1)  # length of the teacher's and the original's answers (SFT, DPO data)
    evaluate: str = option(choices=("every", "chosen"))  # which points the evaluation sets see

    @staticmethod
    def rules(cfg) -> None:
        c = cfg.compare
        for m in c.methods:
            require(m in METHODS, "compare.methods", list(c.methods), f"choose from {', '.join(METHODS)}")
            sweep = c.sweeps.get(m) if c.sweeps else None
            require(
                sweep is not None and len(sweep) > 0, f"compare.sweeps.{m}", sweep, "needs at least one knob"
            )
            for knob, values in sweep.items():
                require(
                    OmegaConf.is_list(values) and len(values) > 0, f"compare.sweeps.{m}.{knob}", values,
                    "needs a non-empty list of values",
                )  # fmt: skip
                if m in KNOBS:
                    require(
                        knob in KNOBS[m], f"compare.sweeps.{m}", knob, f"knobs of {m}: {', '.join(KNOBS[m])}"
                    )


@dataclass
class Point:
    """One setting of one method."""

    method: str
    knobs: dict  # knob or run override -> value
    directory: Path

    @property
    def label(self) -> str:
        return setting(self.knobs)


def setting(knobs: dict) -> str:
    """A point's knobs as ``k=v, ...``."""
    return ", ".join(f"{k}={v}" for k, v in knobs.items())


def points(cfg, out: Path, base: list[str]) -> list[Point]:
    """Every method's sweep points, each with a directory named after a hash of what defines it."""
    found = []
    for m in cfg.compare.methods:
        sweep = OmegaConf.to_container(cfg.compare.sweeps[m])
        for values in itertools.product(*sweep.values()):
            knobs = dict(zip(sweep, values))
            key = json.dumps({"method": m, "knobs": knobs, "base": base, "seed": cfg.seed}, sort_keys=True)
            digest = hashlib.sha256(key.encode()).hexdigest()[:10]
            found.append(Point(m, knobs, out / m / digest))
    return found


def base_overrides() -> list[str]:
    """The command line's overrides a method's own run inherits (not the comparison's or Hydra's)."""
    task = HydraConfig.get().overrides.task
    return [o for o in task if not o.lstrip("+~").startswith(("compare.", "hydra.", "stages="))]


def subcommand(module: str, overrides: list[str], run_dir: Path) -> dict:
    """``python -m <module>`` with ``overrides`` into ``run_dir``; returns its metrics.json."""
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    log.info("running: %s", " ".join(cmd))
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
        raise SafeSteerError(f"{module} failed in {run_dir} (exit {done.returncode}): {tail[0]}")
    return json.loads((run_dir / "metrics.json").read_text())


def run_safesteer(p: Point, base: list[str], prepared: Prepared) -> dict:
    """The SafeSteer run at this point (``full_vocab``: with the full-vocabulary loss), with the
    comparison's teacher (its vector and safety tokens)."""
    teacher = [f"tokens.path={prepared.tokens_path}"]
    if prepared.vector_path is not None:
        teacher.append(f"steering.vector={prepared.vector_path}")
    extra = ["learner.loss=full"] if p.method == "full_vocab" else []
    knobs = [f"{k}={v}" for k, v in p.knobs.items()]
    m = subcommand("safesteer.run", [*base, *teacher, *extra, *knobs, "stages=[distill,evaluate,export]"],
                   p.directory / "run")  # fmt: skip
    trained = sum(r["completion_tokens"] for r in m["history"] if not r["skipped"])
    return {
        "validation": m["validation"],
        "eval": m["after"],
        "original": m["before"],
        "groups": m["groups"],
        "train_seconds": m["timings"]["distill"],
        "trained_tokens": trained,
        "answers": str(p.directory / "run" / "answers.jsonl"),
    }


def validate(cfg, model_dir: str) -> dict:
    """The selectivity of a trained model on the validation prompts (``trainer.select``)."""
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path, cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    device = default_device()
    dtype = compute_dtype(cfg.model.dtype, device)
    engine = RolloutWorker(
        model_dir, typed(cfg.rollout), dtype, cfg.seed, device, cfg.model.trust_remote_code
    )
    try:
        return Selector.build(cfg, tok, Path(model_dir)).score(engine.greedy)
    finally:
        engine.close()


def train_baseline(cfg, p: Point, answers, prepared: Prepared) -> dict:
    """Train the baseline at this point, then validate the trained model."""
    model_path = resolve_model_path(cfg.model.path)
    k = p.knobs
    if p.method == "distill":
        trained = baselines.train_distill(
            cfg, model_path, prepared.vector_path, float(k["lr"]), p.directory / "model"
        )
    elif p.method == "sft":
        trained = baselines.train_sft(cfg, model_path, baselines.sft_examples(answers()), float(k["lr"]),
                                      float(k["epochs"]), p.directory / "model")  # fmt: skip
    else:
        trained = baselines.train_dpo(cfg, model_path, baselines.dpo_examples(answers()), float(k["beta"]),
                                      float(k["lr"]), float(k["epochs"]), p.directory / "model")  # fmt: skip
    return {
        "validation": validate(cfg, str(trained.model_dir)),
        "train_seconds": trained.wall_seconds,
        "trained_tokens": trained.trained_tokens,
        "train_steps": trained.steps,
        "model": str(trained.model_dir),
    }


def evaluate_baseline(p: Point, base: list[str], model_dir: str) -> dict:
    """A trained baseline's model on the evaluation sets (``python -m safesteer.evaluate``)."""
    m = subcommand("safesteer.evaluate", [*base, f"eval.model={model_dir}"], p.directory / "eval")
    return {
        "eval": m["after"],
        "original": m["before"],
        "groups": m["groups"],
        "answers": str(p.directory / "eval" / "answers.jsonl"),
    }


def deployment(cfg, p: Point, model_path: str, model, tok, prepared: Prepared) -> inference.Deployed:
    """The original model served as this point says: with the safety system prompt, or with the
    teacher's vector at the point's coefficient (``gated``: on the prompts the harm probe flags);
    its answers from a :class:`safesteer.inference.SteeringEngine`."""
    if p.method == "system_prompt":
        system = p.knobs["prompt"] or SAFETY_SYSTEM_PROMPT
        engine = inference.SteeringEngine(cfg, model_path, None, len(tok(system)["input_ids"]))
        return inference.Deployed(model, tok, engine, system=system)
    if prepared.vector_path is None:
        raise SafeSteerError(f"compare method {p.method} needs a steering vector (teacher.kind=vector)")
    vector = load_vector(prepared.vector_path, model.config.hidden_size, len(decoder_layers(model)))
    probe = build_probe(cfg, model, tok)[0] if p.method == "gated" else None
    engine = inference.SteeringEngine(cfg, model_path, vector)
    return inference.Deployed(
        model, tok, engine, vector, float(p.knobs["coeff"]), cfg.teacher.positions, probe
    )


def run_deployed(cfg, p: Point, prepared: Prepared, validated: bool, evaluated: bool) -> dict:
    """Validate and/or evaluate the original model served with a system prompt or a steering hook."""
    model_path = resolve_model_path(cfg.model.path)
    model, tok = load_hf(model_path, "float32", cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    served = deployment(cfg, p, model_path, model, tok, prepared)
    out: dict = {}
    try:
        if validated:
            sel, texts = cfg.trainer.select, {}
            for kind in ("harmful", "harmless"):
                prompts = [
                    x.instruction for x in chat_prompts(tok, sel[kind], cfg.model.max_prompt_tokens)[0]
                ]
                answers = served.answer(prompts, sel.max_new_tokens)
                texts[kind] = [tok.decode(x, skip_special_tokens=True) for x in answers]
            out.update(validation=selectivity(texts["harmful"], texts["harmless"]), train_seconds=0.0,
                       trained_tokens=0)  # fmt: skip
        if evaluated:
            m = inference.evaluate_deployed(cfg, model_path, served, p.directory / "answers.jsonl")
            atomic_write_json(p.directory / "metrics.json", m)
            out.update(eval=m["after"], original=m["before"], groups=m["groups"],
                       answers=str(p.directory / "answers.jsonl"))  # fmt: skip
    finally:
        served.engine.close()
    return out


def run_point(cfg, p: Point, base: list[str], prepared: Prepared, answers, evaluated: bool) -> dict:
    """A point's result: its validation, and with ``evaluated`` its evaluation too (a SafeSteer run
    always has both). What its directory already holds is reused; the rest is computed and stored."""
    done = p.directory / "result.json"
    result = json.loads(done.read_text()) if done.is_file() else None
    if result is not None and ("eval" in result or not evaluated):
        log.info("%s (%s): reusing %s", p.method, p.label, done)
        return result
    p.directory.mkdir(parents=True, exist_ok=True)
    STOP.at(f"{p.method} ({p.label})")
    t = time.perf_counter()
    if p.method in DEPLOYED:  # one engine for both
        result = {**(result or {}), **run_deployed(cfg, p, prepared, result is None, evaluated)}
    elif result is None:
        result = (
            train_baseline(cfg, p, answers, prepared)
            if p.method in TRAINED
            else run_safesteer(p, base, prepared)
        )
    if evaluated and "eval" not in result:
        result.update(evaluate_baseline(p, base, result["model"]))
    seconds = result.get("wall_seconds", 0.0) + time.perf_counter() - t
    result.update(method=p.method, knobs=p.knobs, wall_seconds=seconds)
    atomic_write_json(done, result)
    return result


def chosen(results: list[dict]) -> dict[str, dict]:
    """Each method's point with the best validation selectivity (never an evaluation set)."""
    best: dict[str, dict] = {}
    for r in results:
        if (
            r["method"] not in best
            or r["validation"]["selectivity"] > best[r["method"]]["validation"]["selectivity"]
        ):
            best[r["method"]] = r
    return best


def table(best: dict[str, dict]) -> list[str]:
    """The chosen points on the held-out evaluation sets, the original model first (markdown)."""
    any_result = next(iter(best.values()))
    groups = any_result["groups"]
    sets = list(groups)
    head = ["method", "setting", *[f"{s} ({groups[s]})" for s in sets], "harmful mean", "benign mean",
            "edgy mean", "degenerate", "MMLU", "KL", "ppl", "train s", "trained tokens",
            "tokens/s served (original)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, setting: str, e: dict, r: dict | None) -> str:
        cells = [name, setting, *[percent(e["sets"][s]["refusal"]) for s in sets]]
        cells += [percent(e["harmful_refusal_mean"]), percent(e["benign_refusal_mean"]),
                  percent(e["edgy_refusal_mean"]), percent(e["degenerate_benign"]), percent(e["mmlu"]),
                  f"{e['kl_per_token']:.4f}" if "kl_per_token" in e else "0",
                  f"{e['ppl_trained']:.3g}" if "ppl_trained" in e else "",
                  f"{r['train_seconds']:.0f}" if r else "", str(r["trained_tokens"]) if r else "",
                  f"{e['tokens_per_s_deployed']:.0f} ({e['tokens_per_s_original']:.0f})"
                  if "tokens_per_s_deployed" in e else ""]  # fmt: skip
        return "| " + " | ".join(cells) + " |"

    lines.append(row("original", "", any_result["original"], None))
    lines += [row(m, setting(r["knobs"]), r["eval"], r) for m, r in best.items()]
    return lines


def points_table(results: list[dict]) -> list[str]:
    """Every point: its validation score (what chose it) and its evaluation means (markdown)."""
    lines = ["## Every point", "", "| method | setting | validation selectivity | validation harmful / harmless "
             "refusal | harmful mean | benign mean | edgy mean | degenerate | MMLU | KL |", "|" + "---|" * 10]  # fmt: skip
    for r in results:
        v = r["validation"]
        cells = [
            r["method"],
            setting(r["knobs"]),
            f"{v['selectivity']:.3f}",
            f"{percent(v['val_harmful_refusal'])} / {percent(v['val_harmless_refusal'])}",
        ]
        if "eval" in r:
            e = r["eval"]
            cells += [percent(e["harmful_refusal_mean"]), percent(e["benign_refusal_mean"]),
                      percent(e["edgy_refusal_mean"]), percent(e["degenerate_benign"]), percent(e["mmlu"]),
                      f"{e.get('kl_per_token', 0):.4f}"]  # fmt: skip
        else:
            cells += ["not evaluated (compare.evaluate=chosen)"] + [""] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def dominating(results: list[dict], target: dict, max_drop: float = 0.02) -> list[dict]:
    """The points of other methods that beat ``target`` on the evaluation sets: higher mean harmful
    refusal, mean benign refusal no higher, and MMLU within ``max_drop`` of the original's."""
    t = target["eval"]
    return [
        r for r in results
        if r["method"] != target["method"] and "eval" in r
        and r["eval"]["harmful_refusal_mean"] > t["harmful_refusal_mean"]
        and r["eval"]["benign_refusal_mean"] <= t["benign_refusal_mean"]
        and r["original"]["mmlu"] - r["eval"]["mmlu"] <= max_drop + 1e-9
    ]  # fmt: skip


def frontier_lines(results: list[dict], best: dict[str, dict]) -> list[str]:
    """Whether SafeSteer's chosen point is on the frontier (no point of another method dominates it)."""
    if "safesteer" not in best:
        return []
    b = best["safesteer"]
    beaten = dominating(results, b)
    head = f"SafeSteer's chosen point ({setting(b['knobs'])}): "
    if not beaten:
        return [head + "on the frontier: no other point has higher harmful refusal, benign refusal no "
                "higher and MMLU within 2 points of the original's."]  # fmt: skip
    lines = [head + f"dominated by {len(beaten)} point(s) (higher harmful refusal, benign refusal no higher, "
             "MMLU within 2 points):", ""]  # fmt: skip
    for r in beaten:
        e = r["eval"]
        lines.append(f"- {r['method']} ({setting(r['knobs'])}): harmful "
                     f"{percent(e['harmful_refusal_mean'])}, benign {percent(e['benign_refusal_mean'])}, "
                     f"MMLU {percent(e['mmlu'])}")  # fmt: skip
    return lines


def examples(best: dict[str, dict], per_set: int = 2, width: int = 160) -> list[str]:
    """The first answers of every evaluation set, the original's and each chosen point's (markdown)."""
    answers = {}
    for m, r in best.items():
        with open(r["answers"], encoding="utf-8") as f:
            answers[m] = [json.loads(line) for line in f]
    first = next(iter(answers.values()))

    def short(text: str) -> str:
        return " ".join(text.split())[:width].replace("|", "/")

    def answer(m: str, i: int, prompt: str) -> str:
        rs = answers[m]
        return short(rs[i]["after"]["answer"]) if i < len(rs) and rs[i]["prompt"] == prompt else "–"

    lines = ["## Answers (the first of each set)", "", "| set | prompt | original | " + " | ".join(best) + " |",
             "|" + "---|" * (3 + len(best))]  # fmt: skip
    shown: dict[str, int] = {}
    for i, rec in enumerate(first):
        if shown.get(rec["set"], 0) >= per_set:
            continue
        shown[rec["set"]] = shown.get(rec["set"], 0) + 1
        cells = [rec["set"], short(rec["prompt"]), short(rec["before"]["answer"])]
        cells += [answer(m, i, rec["prompt"]) for m in best]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def frontier(results: list[dict], best: dict[str, dict], path: Path) -> None:
    """Harmful refusal against over-refusal on the evaluation sets, MMLU as colour, one curve per method."""
    import matplotlib  # optional: figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: figures only
    import matplotlib.ticker  # optional: figures only

    fig, ax = plt.subplots(figsize=(7, 5))
    mmlu = [r["eval"]["mmlu"] for r in results]
    lo, hi = min(mmlu), max(mmlu) + 1e-9
    for i, m in enumerate(dict.fromkeys(r["method"] for r in results)):
        rs = sorted((r for r in results if r["method"] == m), key=lambda r: r["eval"]["benign_refusal_mean"])
        xs = [r["eval"]["benign_refusal_mean"] for r in rs]
        ys = [r["eval"]["harmful_refusal_mean"] for r in rs]
        ax.plot(xs, ys, "-", color=f"C{i}", label=m, alpha=0.6)
        sc = ax.scatter(xs, ys, c=[r["eval"]["mmlu"] for r in rs], cmap="viridis", vmin=lo, vmax=hi, zorder=3)
        b = best[m]["eval"]
        ax.scatter([b["benign_refusal_mean"]], [b["harmful_refusal_mean"]], s=160, facecolors="none",
                   edgecolors=f"C{i}", linewidths=2, zorder=4)  # fmt: skip
    o = results[0]["original"]
    ax.scatter(
        [o["benign_refusal_mean"]], [o["harmful_refusal_mean"]], marker="x", color="k", label="original"
    )
    fig.colorbar(sc, ax=ax, label="MMLU cloze accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("over-refusal: mean refusal on benign sets")
    ax.set_ylabel("mean refusal on harmful sets")
    ax.set_title("circled: each method's point chosen on validation")
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.rename(path)


def command(cfg) -> None:
    """``python -m safesteer.compare``."""
    out = Path(HydraConfig.get().runtime.output_dir)
    if not cfg.compare.methods:
        raise SafeSteerError("compare.methods: empty; name at least one of " + ", ".join(METHODS))
    model_path = resolve_model_path(cfg.model.path)
    STOP.at("prepare")
    prepared = prepare(cfg, out / "prepare", model_path)  # one teacher for every method
    base = base_overrides()
    answers_file = out / "paired_answers.jsonl"

    def answers() -> baselines.PairedAnswers:  # the SFT and DPO data, generated once
        if not answers_file.is_file():
            a = baselines.paired_answers(cfg, model_path, prepared.vector_path, cfg.compare.answer_tokens)
            baselines.save_answers(answers_file, a)
        return baselines.load_answers(answers_file)

    every = cfg.compare.evaluate == "every"
    pts = points(cfg, out, base)
    results = [run_point(cfg, p, base, prepared, answers, every) for p in pts]
    if not every:  # validation chose; only the chosen points are evaluated
        picked = chosen(results)
        results = [run_point(cfg, p, base, prepared, answers, True) if picked[p.method] is r else r
                   for p, r in zip(pts, results)]  # fmt: skip
    best = chosen(results)
    atomic_write_json(
        out / "compare.json", {"points": results, "chosen": {m: r["knobs"] for m, r in best.items()}}
    )
    lines = ["# Comparison", "", "Each method's setting chosen on validation prompts; held-out evaluation sets.",
             "", *table(best), "", *frontier_lines(results, best), "", *points_table(results), "",
             *examples(best), ""]  # fmt: skip
    atomic_write_text(out / "compare.md", "\n".join(lines))
    frontier([r for r in results if "eval" in r], best, out / "frontier.png")
    atomic_write_text(
        out / "compare.html", markdown_page("SafeSteer comparison", lines, {"frontier": out / "frontier.png"})
    )
    print("\n".join(table(best)))
    print(f"comparison: {out / 'compare.md'}")


if __name__ == "__main__":
    from safesteer.cli import hydra_entry  # here: safesteer.config imports this module for its config

    hydra_entry(command)
