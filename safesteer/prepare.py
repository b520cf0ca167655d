"""The prepare stage: build the steered teacher and select the safety tokens.

``python -m safesteer.prepare`` (Hydra, same config as ``safesteer.run``) writes ``vector.safetensors``,
``safety_tokens.json`` and ``prepare.json`` to its run directory and prints the teacher's refusal
and degenerate rates on held-out harmful prompts. Results are cached under
``$SAFESTEER_CACHE/prepare/<key>`` for the same model, data and settings, and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from safesteer.core import judge, search
from safesteer.core import steering as S
from safesteer.core.generation import chat_texts, generate
from safesteer.core.probe import HarmProbe, last_token_states
from safesteer.core.probe import fit as fit_probe
from safesteer.core.tokens import TOKEN_METHODS, SafetyTokens, select_safety_tokens
from safesteer.data import load_prompts, load_sets
from safesteer.errors import SafeSteerError
from safesteer.models import fingerprint, load_hf, resolve_model_path
from safesteer.paths import atomic_dir, atomic_write_bytes, atomic_write_json, cache_dir
from safesteer.schema import option, require


@dataclass
class SteeringConfig:
    """``steering``: the steering vector's extraction and search (conf/steering)."""

    vector: str | None = option()
    methods: list[str] = option(default=[])
    n_train: int = option(ge=1)
    n_val: int = option(ge=1)
    layers: list[int] | None = option()
    depth: list[float] = option(default=[])
    max_kl: float | None = option()
    min_steering_score: float | None = option()
    top_candidates: int = option(ge=1)
    coeffs: list[float] = option(default=[])
    coeff_unit: str = option(choices=search.COEFF_UNITS)
    max_new_tokens: int = option(ge=1)
    max_degenerate: float = option(fraction="[]")
    max_benign_refusal: float = option(fraction="[]")
    batch_size: int = option(ge=1)

    @staticmethod
    def rules(cfg) -> None:
        sm = list(cfg.steering.methods)
        ok = bool(sm) and all(m in search.METHODS for m in sm)
        require(ok, "steering.methods", sm, f"choose from {', '.join(search.METHODS)}")
        coeffs = list(cfg.steering.coeffs)
        require(len(coeffs) > 0, "steering.coeffs", coeffs, "needs at least one coefficient")
        d = list(cfg.steering.depth)
        ok = len(d) == 2 and 0 <= d[0] < d[1] <= 1
        require(ok, "steering.depth", d, "must be [lo, hi], fractions of depth with 0 <= lo < hi <= 1")


@dataclass
class TokensConfig:
    """``tokens``: the safety-token selection (conf/tokens)."""

    path: str | None = option()
    method: str = option(choices=TOKEN_METHODS)
    k: int = option(ge=1)
    n_prompts: int = option(ge=1)
    samples_per_prompt: int = option(ge=1)
    horizon: int = option(ge=1)
    temperature: float = option(gt=0)
    top_p: float = option(fraction="(]")
    harmful: Any = option()
    contrast_weight: float = option(ge=0)
    vote_top: int = option(ge=1)
    min_steered_prob: float = option(ge=0)
    min_student_mass: float = option(ge=0)
    batch_size: int = option(ge=1)


@dataclass
class ProbeConfig:
    """``probe``: the harm probe that can gate the teacher (conf/probe)."""

    harmful: Any = option()
    harmless: Any = option()
    val_harmful: Any = option()
    val_harmless: Any = option()
    layers: list[int] = option(default=[])
    batch_size: int = option(ge=1)

    @staticmethod
    def rules(cfg) -> None:
        layers = list(cfg.probe.layers)
        require(len(layers) > 0, "probe.layers", layers, "needs at least one layer")


log = logging.getLogger(__name__)

VECTOR_FILE, TOKENS_FILE, REPORT_FILE = "vector.safetensors", "safety_tokens.json", "prepare.json"


@dataclass
class Prepared:
    vector_path: Path | None
    tokens_path: Path | None
    report: dict


def _plain(x):
    """A config value as plain Python (a ListConfig of set names as a list)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x) if OmegaConf.is_config(x) else x


def _instructions(source, n: int | None, seed: int) -> list[str]:
    items = [p.instruction for p in load_sets(source)]
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items


def _data_fingerprint(cfg) -> dict:
    out = {}
    for key in ("direction_harmful", "direction_harmless", "val_harmful", "val_harmless"):
        texts = [p.instruction for p in load_sets(cfg.data[key])]
        out[key] = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return out


def cache_key(cfg, model_path: str) -> str:
    from omegaconf import OmegaConf

    blob = json.dumps(
        {
            "model": fingerprint(model_path),
            "steering": OmegaConf.to_container(cfg.steering, resolve=True),
            "tokens": OmegaConf.to_container(cfg.tokens, resolve=True),
            "teacher": {
                "kind": cfg.teacher.kind,
                "system_prompt": cfg.teacher.system_prompt,
            },
            "probe": OmegaConf.to_container(cfg.probe, resolve=True) if cfg.teacher.gate == "probe" else None,
            "data": _data_fingerprint(cfg),
            "seed": cfg.seed,
            "judge": judge.VERSION,
            "version": 2,  # 2: zero candidates skipped by the reference selection
            # the prompts' template arguments (absent when none: earlier caches stay valid)
            **(
                {"chat": OmegaConf.to_container(cfg.model.chat_template_kwargs)}
                if cfg.model.chat_template_kwargs
                else {}
            ),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_probe(cfg, model, tok) -> tuple[HarmProbe, dict]:
    """The harm probe (:mod:`safesteer.core.probe`) from ``cfg.probe``'s prompt sets, at its best layer."""
    pc = cfg.probe
    n_layers = len(model.model.layers)
    bad = [layer for layer in pc.layers if not 0 <= layer < n_layers]
    if bad:
        raise SafeSteerError(f"probe.layers={bad}: out of range for a {n_layers}-layer model")

    def states(key: str) -> dict:
        texts = chat_texts(tok, _instructions(pc[key], None, cfg.seed))
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return last_token_states(model, ids, list(pc.layers), pc.batch_size)

    with tqdm(total=4, desc="harm probe") as bar:
        got = {}
        for key in ("harmful", "harmless", "val_harmful", "val_harmless"):
            got[key] = states(key)
            bar.update(1)
    train = {layer: (got["harmful"][layer], got["harmless"][layer]) for layer in pc.layers}
    val = {layer: (got["val_harmful"][layer], got["val_harmless"][layer]) for layer in pc.layers}
    probe, by_layer = fit_probe(train, val)
    log.info(
        "harm probe: layer %d, validation AUROC %.3f, flags %.0f%% of harmful and %.0f%% of harmless prompts",
        probe.layer, probe.metrics["auroc"], 100 * probe.metrics["tpr"], 100 * probe.metrics["fpr"],
    )  # fmt: skip
    return probe, {"layer": probe.layer, "threshold": probe.threshold, "by_layer": by_layer}


def search_vector(cfg, model, tok, model_path: str) -> tuple[S.SteeringVector, dict]:
    """Candidates -> reference filters -> generation-judged coefficient search."""
    sc, seed = cfg.steering, cfg.seed
    harmful = _instructions(cfg.data.direction_harmful, sc.n_train, seed)
    harmless = _instructions(cfg.data.direction_harmless, sc.n_train, seed)
    val_h = _instructions(cfg.data.val_harmful, sc.n_val, seed)
    val_b = _instructions(cfg.data.val_harmless, sc.n_val, seed)
    n_layers = len(model.model.layers)
    layers = list(sc.layers) if sc.layers is not None else search.depth_layers(n_layers, sc.depth)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise SafeSteerError(f"steering.layers={bad}: out of range for a {n_layers}-layer model")
    if not layers:
        raise SafeSteerError(
            f"steering.depth={list(sc.depth)}: no layer of a {n_layers}-layer model in that range"
        )
    norms = None
    if sc.coeff_unit == "residual":  # coefficients as fractions of the residual stream's norm
        norms = search.residual_norms(model, tok, chat_texts(tok, harmful + harmless), sc.batch_size)
    candidates: list[tuple[str, search.CandidateScore, torch.Tensor]] = []
    all_scores: dict[str, list[dict]] = {}
    for method in sc.methods:
        if method not in ("diff_in_means", "contrastive"):
            raise SafeSteerError(
                f"steering.methods: unknown method {method!r}; choose from {', '.join(search.METHODS)}"
            )
        n = len(harmful) + (len(harmless) if method == "diff_in_means" else len(harmful))
        with tqdm(
            total=n, desc=f"activations ({method}, {len(harmful)} harmful prompts)", leave=False
        ) as bar:
            if method == "diff_in_means":
                cands = search.diff_in_means_candidates(model, tok, harmful, harmless, sc.batch_size, bar)
            else:
                cands = search.contrastive_candidates(model, tok, harmful, sc.batch_size, bar)
        with tqdm(
            total=len(layers) * cands.shape[1], desc=f"reference filters ({method})", leave=False
        ) as bar:
            scores = search.reference_scores(model, tok, cands, val_h, val_b, layers, sc.batch_size, bar)
        all_scores[method] = [asdict(s) for s in scores]
        for s in search.reference_filter(scores, sc.max_kl, sc.min_steering_score)[: sc.top_candidates]:
            candidates.append((method, s, cands[s.layer, s.position]))
    if not candidates:
        raise SafeSteerError(
            f"no steering candidate passed the reference filters (ablation KL <= steering.max_kl={sc.max_kl}, "
            f"steering score >= steering.min_steering_score={sc.min_steering_score}); set them to null, or try "
            f"other steering.layers or steering.methods"
        )
    by_key = {(m, s.layer, s.position): (m, s, v) for m, s, v in candidates}
    with tqdm(total=len(candidates) * len(sc.coeffs), desc="steering search (generate + judge)") as bar:
        trials = []
        for m, s, v in candidates:
            for t in search.coeff_search(
                model,
                tok,
                [(s.layer, s.position, v)],
                search.absolute_coeffs(
                    sc.coeffs, sc.coeff_unit, v, None if norms is None else norms[s.layer]
                ),
                val_h,
                val_b,
                sc.max_new_tokens,
                sc.batch_size,
                bar,
            ):
                trials.append((m, t))
    best = search.best_trial([t for _, t in trials], sc.max_degenerate, sc.max_benign_refusal)
    method = next(m for m, t in trials if t is best)
    _, score, vec = by_key[(method, best.layer, best.position)]
    sv = S.SteeringVector(
        vector=vec.float().cpu(),
        layer=best.layer,
        coeff=best.coeff,
        method=method,
        position=best.position,
        model=model_path,
        provenance={
            "harmful": _plain(cfg.data.direction_harmful),
            "harmless": _plain(cfg.data.direction_harmless),
            "val_harmful": _plain(cfg.data.val_harmful),
            "val_harmless": _plain(cfg.data.val_harmless),
            "n_train": len(harmful),
            "n_val": len(val_h),
            "seed": seed,
        },
        metrics={**asdict(best), **asdict(score)},
    )
    report = {
        "chosen": {"method": method, **asdict(best)},
        **({"residual_norms": norms.tolist()} if norms is not None else {}),
        "trials": [{"method": m, **asdict(t)} for m, t in trials],
        "reference_scores": all_scores,
    }
    return sv, report


def prepare(cfg, out_dir: Path, model_path: str | None = None) -> Prepared:
    """Produce (or reuse) the steering vector and the safety tokens in ``out_dir``."""
    model_path = model_path or resolve_model_path(cfg.model.path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    given_vector, given_tokens = cfg.steering.vector, cfg.tokens.path
    key = cache_key(cfg, model_path)
    cached = cache_dir() / "prepare" / key
    needs_vector = cfg.teacher.kind == "vector"
    if not given_vector and not given_tokens and (cached / REPORT_FILE).is_file():
        log.info("prepare: reusing %s", cached)
        for name in (VECTOR_FILE, TOKENS_FILE, REPORT_FILE):
            if (cached / name).is_file():
                shutil.copy2(cached / name, out_dir / name)
        report = json.loads((out_dir / REPORT_FILE).read_text())
        report["cache"] = str(cached)
        return Prepared(out_dir / VECTOR_FILE if needs_vector else None, out_dir / TOKENS_FILE, report)

    torch.manual_seed(cfg.seed)
    model, tok = load_hf(model_path, "float32", cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    if torch.cuda.is_available():
        model.cuda()
    hidden, n_layers = model.config.get_text_config().hidden_size, len(model.model.layers)
    report: dict = {"model": model_path, "cache_key": key}
    sv = None
    if needs_vector:
        if given_vector:
            sv = S.load_vector(given_vector, hidden, n_layers)
            report["vector"] = {"given": str(given_vector)}
        else:
            sv, report["vector"] = search_vector(cfg, model, tok, model_path)
        if cfg.teacher.gate == "probe" and sv.probe is None:
            sv.probe, report["probe"] = build_probe(cfg, model, tok)
        atomic_write_bytes(out_dir / VECTOR_FILE, S.vector_bytes(sv))
    # Safety tokens are where the searched teacher (its chosen coefficient, every position: the
    # reference) differs from the student; teacher.coeff / teacher.positions shape distillation only.
    teacher = S.Teacher(
        kind=cfg.teacher.kind,
        vector=sv,
        **({"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}),
    )
    if given_tokens:
        st = SafetyTokens.load(given_tokens, vocab_size=model.get_output_embeddings().weight.shape[0])
    else:
        tc = cfg.tokens
        prompts = _instructions(cfg.data.val_harmless, tc.n_prompts, cfg.seed)
        n = len(prompts) * (2 if tc.method == "contrast" else 1)
        with tqdm(total=n, desc=f"safety tokens ({tc.method})") as bar:
            st = select_safety_tokens(
                model,
                tok,
                teacher,
                prompts,
                method=tc.method,
                k=tc.k,
                samples_per_prompt=tc.samples_per_prompt,
                horizon=tc.horizon,
                temperature=tc.temperature,
                top_p=tc.top_p,
                vote_top=tc.vote_top,
                min_steered_prob=tc.min_steered_prob,
                min_student_mass=tc.min_student_mass,
                batch_size=tc.batch_size,
                progress=bar,
                harmful=_instructions(tc.harmful, tc.n_prompts, cfg.seed) if tc.method == "contrast" else (),
                contrast_weight=tc.contrast_weight,
            )
    atomic_write_json(out_dir / TOKENS_FILE, asdict(st))
    report["tokens"] = {
        "method": st.method,
        "k": len(st.ids),
        "student_mass": st.student_mass,
        "steered_mass": st.steered_mass,
        "top": st.strings[:20],
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    if not given_vector and not given_tokens:
        with atomic_dir(cached, keep_existing=True) as tmp:  # a concurrent run's equal entry wins
            for name in (VECTOR_FILE, TOKENS_FILE, REPORT_FILE):
                if (out_dir / name).is_file():
                    shutil.copy2(out_dir / name, tmp / name)
    del model
    return Prepared(out_dir / VECTOR_FILE if needs_vector else None, out_dir / TOKENS_FILE, report)


def measure_teacher(cfg, prepared: Prepared, model_path: str, n: int = 48, max_new_tokens: int = 32) -> dict:
    """Refusal / degenerate rates of the teacher on the first ``n`` prompts of each evaluation set.

    The sets are the evaluation's (``eval.harmful_sets`` and ``eval.edgy_sets``): held out from
    training and from the direction prompts, so the teacher's ceiling can be read beside the
    student's results.
    """
    model, tok = load_hf(model_path, "float32", cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    sv = S.load_vector(prepared.vector_path) if prepared.vector_path else None
    extra = {"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}
    teacher = S.Teacher(
        kind=cfg.teacher.kind, vector=sv, coeff=cfg.teacher.coeff, positions=cfg.teacher.positions, **extra
    )
    out = {}
    for name in [*cfg.eval.harmful_sets, *cfg.eval.edgy_sets]:
        prompts = [p.instruction for p in load_prompts(name, limit=n)]
        with teacher.apply(model):
            ids = generate(model, tok, teacher.prompt_texts(tok, prompts), max_new_tokens)
        out[name] = judge.rates(tok.decode(x, skip_special_tokens=True) for x in ids)
    return out


def command(cfg) -> None:
    """``python -m safesteer.prepare``."""
    from hydra.core.hydra_config import HydraConfig

    from safesteer.report import percent

    out = Path(HydraConfig.get().runtime.output_dir)
    model_path = resolve_model_path(cfg.model.path)
    prepared = prepare(cfg, out, model_path)
    print(json.dumps(prepared.report.get("vector", {}).get("chosen", {}), indent=2))
    st = SafetyTokens.load(prepared.tokens_path)
    print(
        f"safety tokens ({st.method}), student mass {st.student_mass:.3f}, steered mass {st.steered_mass:.3f}"
    )
    print(st.table(20))
    rates = measure_teacher(cfg, prepared, model_path)
    for name, r in rates.items():
        print(
            f"teacher on {name} (n={r['n']}): refusal {percent(r['refusal'])}, preamble {percent(r['preamble'])}, "
            f"degenerate {percent(r['degenerate'])}"
        )
    report = json.loads((out / REPORT_FILE).read_text())
    report["teacher_heldout"] = rates
    atomic_write_json(out / REPORT_FILE, report)
    print(f"artifacts in {out}")


if __name__ == "__main__":
    from safesteer.cli import hydra_entry  # here: safesteer.config imports this module for its config

    hydra_entry(command)
