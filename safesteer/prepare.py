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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tqdm import tqdm

from safesteer.core import judge, search
from safesteer.core import steering as S
from safesteer.core.generation import chat_texts, generate
from safesteer.core.probe import HarmProbe, last_token_states
from safesteer.core.probe import fit as fit_probe
from safesteer.core.tokens import TOKEN_METHODS, SafetyTokens, TokenSelection, select_safety_tokens
from safesteer.data import load_prompts, load_sets
from safesteer.errors import SafeSteerError
from safesteer.models import fingerprint, load_hf, resolve_model_path
from safesteer.paths import atomic_dir, atomic_write_bytes, atomic_write_json, cache_dir
from safesteer.report import percent
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
    depth: list[float] = option(default=[])
    batch_size: int = option(ge=1)

    @staticmethod
    def rules(cfg) -> None:
        d = list(cfg.probe.depth)
        ok = len(d) > 0 and all(0 <= f < 1 for f in d)
        require(ok, "probe.depth", d, "needs fractions of depth in [0, 1), one per candidate layer")


log = logging.getLogger(__name__)

VECTOR_FILE, TOKENS_FILE, REPORT_FILE = "vector.safetensors", "safety_tokens.json", "prepare.json"
ARTIFACTS = (VECTOR_FILE, TOKENS_FILE, REPORT_FILE)


@dataclass
class Prepared:
    vector_path: Path | None
    tokens_path: Path | None
    report: dict


@dataclass
class DirectionPrompts:
    """The steering search's prompts: the direction's harmful and harmless ones, and the validation ones."""

    harmful: list[str]
    harmless: list[str]
    val_harmful: list[str]
    val_harmless: list[str]


@dataclass
class Candidate:
    """A candidate steering vector that passed the reference filters."""

    method: str
    score: search.CandidateScore
    vector: torch.Tensor


def _plain(x):
    """A config value as plain Python (a ListConfig of set names as a list)."""
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


# -------------------------------------------------------------------------------------- harm probe
def probe_layers(depth: Sequence[float], n_layers: int) -> list[int]:
    """The probe's candidate layers, sorted, for fractions of depth (``probe.depth``): for each
    fraction ``f``, the first layer whose slice ``[l / L, (l + 1) / L]`` of depth starts at or after
    ``f`` (``l = ceil(f * L)``), the rule ``steering.depth`` applies to its lower bound
    (:func:`safesteer.core.search.depth_layers`). [0.46, 0.6, 0.73] of 30 layers: [14, 18, 22]."""
    layers = set()
    for f in depth:
        at = search.depth_layers(n_layers, (f, 1.0)) if 0 <= f < 1 else []
        if not at:
            raise SafeSteerError(
                f"probe.depth={f:g}: no layer of a {n_layers}-layer model at that depth (layer l sits at "
                f"l/{n_layers}, the deepest at {(n_layers - 1) / n_layers:.3g})"
            )
        layers.add(at[0])
    return sorted(layers)


def build_probe(cfg, model, tok) -> tuple[HarmProbe, dict]:
    """The harm probe (:mod:`safesteer.core.probe`) from ``cfg.probe``'s prompt sets, at its best layer."""
    pc = cfg.probe
    layers = probe_layers(pc.depth, len(model.model.layers))
    got = {}
    for key in tqdm(("harmful", "harmless", "val_harmful", "val_harmless"), desc="harm probe"):
        texts = chat_texts(tok, _instructions(pc[key], None, cfg.seed))
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        got[key] = last_token_states(model, ids, layers, pc.batch_size)
    train = {layer: (got["harmful"][layer], got["harmless"][layer]) for layer in layers}
    val = {layer: (got["val_harmful"][layer], got["val_harmless"][layer]) for layer in layers}
    probe, by_layer = fit_probe(train, val)
    log.info(
        "harm probe: layer %d, validation AUROC %.3f, flags %.0f%% of harmful and %.0f%% of harmless prompts",
        probe.layer, probe.metrics["auroc"], 100 * probe.metrics["tpr"], 100 * probe.metrics["fpr"],
    )  # fmt: skip
    return probe, {"layer": probe.layer, "threshold": probe.threshold, "by_layer": by_layer}


# ---------------------------------------------------------------------------------- steering search
def _direction_prompts(cfg) -> DirectionPrompts:
    steer_cfg, d, seed = cfg.steering, cfg.data, cfg.seed
    return DirectionPrompts(
        harmful=_instructions(d.direction_harmful, steer_cfg.n_train, seed),
        harmless=_instructions(d.direction_harmless, steer_cfg.n_train, seed),
        val_harmful=_instructions(d.val_harmful, steer_cfg.n_val, seed),
        val_harmless=_instructions(d.val_harmless, steer_cfg.n_val, seed),
    )


def steering_layers(steer_cfg, n_layers: int) -> list[int]:
    """The layers the search considers: ``steering.layers``, else those of ``steering.depth``."""
    layers = (
        list(steer_cfg.layers)
        if steer_cfg.layers is not None
        else search.depth_layers(n_layers, steer_cfg.depth)
    )
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise SafeSteerError(f"steering.layers={bad}: out of range for a {n_layers}-layer model")
    if not layers:
        raise SafeSteerError(
            f"steering.depth={list(steer_cfg.depth)}: no layer of a {n_layers}-layer model in that range"
        )
    return layers


def _method_candidates(
    model, tok, method: str, p: DirectionPrompts, layers: list[int], steer_cfg
) -> tuple[list[Candidate], list[dict]]:
    """One ``steering.methods`` entry's candidates at ``layers``: the best ``steering.top_candidates``
    that pass the reference filters, and every candidate's reference scores."""
    if method not in search.METHODS:
        raise SafeSteerError(
            f"steering.methods: unknown method {method!r}; choose from {', '.join(search.METHODS)}"
        )
    n = len(p.harmful) + (len(p.harmless) if method == "diff_in_means" else len(p.harmful))
    with tqdm(total=n, desc=f"activations ({method}, {len(p.harmful)} harmful prompts)", leave=False) as bar:
        if method == "diff_in_means":
            cands = search.diff_in_means_candidates(
                model, tok, p.harmful, p.harmless, steer_cfg.batch_size, bar
            )
        else:
            cands = search.contrastive_candidates(model, tok, p.harmful, steer_cfg.batch_size, bar)
    with tqdm(total=len(layers) * cands.shape[1], desc=f"reference filters ({method})", leave=False) as bar:
        val_h, val_b = p.val_harmful, p.val_harmless
        scores = search.reference_scores(model, tok, cands, val_h, val_b, layers, steer_cfg.batch_size, bar)
    kept = search.reference_filter(scores, steer_cfg.max_kl, steer_cfg.min_steering_score)[
        : steer_cfg.top_candidates
    ]
    return [Candidate(method, s, cands[s.layer, s.position]) for s in kept], [asdict(s) for s in scores]


def _coeff_trials(
    model, tok, candidates: list[Candidate], norms: torch.Tensor | None, p: DirectionPrompts, steer_cfg
) -> list[tuple[Candidate, search.SteeringTrial]]:
    """Every candidate at every ``steering.coeffs`` (in ``steering.coeff_unit``), generated and judged."""
    trials = []
    with tqdm(
        total=len(candidates) * len(steer_cfg.coeffs), desc="steering search (generate + judge)"
    ) as bar:
        for c in candidates:
            norm = None if norms is None else norms[c.score.layer]
            coeffs = search.absolute_coeffs(steer_cfg.coeffs, steer_cfg.coeff_unit, c.vector, norm)
            at = [(c.score.layer, c.score.position, c.vector)]
            for t in search.coeff_search(
                model,
                tok,
                at,
                coeffs,
                p.val_harmful,
                p.val_harmless,
                steer_cfg.max_new_tokens,
                steer_cfg.batch_size,
                bar,
            ):
                trials.append((c, t))
    return trials


def _vector(
    cfg, chosen: Candidate, best: search.SteeringTrial, p: DirectionPrompts, model_path: str
) -> S.SteeringVector:
    """The chosen candidate at the best trial's coefficient, with where it came from."""
    d = cfg.data
    return S.SteeringVector(
        vector=chosen.vector.float().cpu(),
        layer=best.layer,
        coeff=best.coeff,
        method=chosen.method,
        position=best.position,
        model=model_path,
        provenance={
            "harmful": _plain(d.direction_harmful),
            "harmless": _plain(d.direction_harmless),
            "val_harmful": _plain(d.val_harmful),
            "val_harmless": _plain(d.val_harmless),
            "n_train": len(p.harmful),
            "n_val": len(p.val_harmful),
            "seed": cfg.seed,
        },
        metrics={**asdict(best), **asdict(chosen.score)},
    )


def search_vector(cfg, model, tok, model_path: str) -> tuple[S.SteeringVector, dict]:
    """Candidates -> reference filters -> generation-judged coefficient search."""
    steer_cfg = cfg.steering
    p = _direction_prompts(cfg)
    layers = steering_layers(steer_cfg, len(model.model.layers))
    norms = None
    if steer_cfg.coeff_unit == "residual":  # coefficients as fractions of the residual stream's norm
        norms = search.residual_norms(
            model, tok, chat_texts(tok, p.harmful + p.harmless), steer_cfg.batch_size
        )
    candidates: list[Candidate] = []
    reference_scores: dict[str, list[dict]] = {}
    for method in steer_cfg.methods:
        kept, reference_scores[method] = _method_candidates(model, tok, method, p, layers, steer_cfg)
        candidates += kept
    if not candidates:
        raise SafeSteerError(
            f"no steering candidate passed the reference filters (ablation KL <= steering.max_kl={steer_cfg.max_kl}, "
            f"steering score >= steering.min_steering_score={steer_cfg.min_steering_score}); set them to null, or try "
            f"other steering.layers or steering.methods"
        )
    trials = _coeff_trials(model, tok, candidates, norms, p, steer_cfg)
    best = search.best_trial([t for _, t in trials], steer_cfg.max_degenerate, steer_cfg.max_benign_refusal)
    chosen = next(c for c, t in trials if t is best)
    report = {
        "chosen": {"method": chosen.method, **asdict(best)},
        **({"residual_norms": norms.tolist()} if norms is not None else {}),
        "trials": [{"method": c.method, **asdict(t)} for c, t in trials],
        "reference_scores": reference_scores,
    }
    return _vector(cfg, chosen, best, p, model_path), report


# ----------------------------------------------------------------------------------- prepare stage
def token_selection(tc) -> TokenSelection:
    """``cfg.tokens``'s selection knobs as the :class:`TokenSelection` :mod:`safesteer.core.tokens` takes."""
    return TokenSelection(
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
        contrast_weight=tc.contrast_weight,
    )


def _steering_vector(cfg, model, tok, model_path: str) -> tuple[S.SteeringVector, dict]:
    """The given (``steering.vector``) or searched steering vector, with the harm probe when it gates
    the teacher; and their report entries."""
    report = {}
    if cfg.steering.vector:
        hidden = model.config.get_text_config().hidden_size
        sv = S.load_vector(cfg.steering.vector, hidden, len(model.model.layers))
        report["vector"] = {"given": str(cfg.steering.vector)}
    else:
        sv, report["vector"] = search_vector(cfg, model, tok, model_path)
    if cfg.teacher.gate == "probe" and sv.probe is None:
        sv.probe, report["probe"] = build_probe(cfg, model, tok)
    return sv, report


def _reference_teacher(cfg, sv: S.SteeringVector | None) -> S.Teacher:
    """The teacher the safety tokens are selected against: the searched one (its chosen coefficient,
    every position: the reference); teacher.coeff / teacher.positions shape distillation only."""
    extra = {"system_prompt": cfg.teacher.system_prompt} if cfg.teacher.system_prompt else {}
    return S.Teacher(kind=cfg.teacher.kind, vector=sv, **extra)


def _safety_tokens(cfg, model, tok, teacher: S.Teacher) -> SafetyTokens:
    """The given safety tokens (``tokens.path``), or the selection where ``teacher`` differs from the
    student, on ``tokens.n_prompts`` of the ``data.val_harmless`` prompts."""
    tc = cfg.tokens
    if tc.path:
        return SafetyTokens.load(tc.path, vocab_size=model.get_output_embeddings().weight.shape[0])
    selection = token_selection(tc)
    prompts = _instructions(cfg.data.val_harmless, tc.n_prompts, cfg.seed)
    harmful = _instructions(tc.harmful, tc.n_prompts, cfg.seed) if selection.method == "contrast" else []
    with tqdm(total=len(prompts) + len(harmful), desc=f"safety tokens ({selection.method})") as bar:
        return select_safety_tokens(model, tok, teacher, prompts, selection, harmful, bar)


def _prepared(cfg, out_dir: Path, report: dict) -> Prepared:
    vector = out_dir / VECTOR_FILE if cfg.teacher.kind == "vector" else None
    return Prepared(vector, out_dir / TOKENS_FILE, report)


def _reuse(cfg, cached: Path, out_dir: Path) -> Prepared:
    log.info("prepare: reusing %s", cached)
    for name in ARTIFACTS:
        if (cached / name).is_file():
            shutil.copy2(cached / name, out_dir / name)
    report = json.loads((out_dir / REPORT_FILE).read_text())
    report["cache"] = str(cached)
    return _prepared(cfg, out_dir, report)


def _store(out_dir: Path, cached: Path) -> None:
    with atomic_dir(cached, keep_existing=True) as tmp:  # a concurrent run's equal entry wins
        for name in ARTIFACTS:
            if (out_dir / name).is_file():
                shutil.copy2(out_dir / name, tmp / name)


def prepare(cfg, out_dir: Path, model_path: str | None = None) -> Prepared:
    """Produce (or reuse) the steering vector and the safety tokens in ``out_dir``."""
    model_path = model_path or resolve_model_path(cfg.model.path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg, model_path)
    cached = cache_dir() / "prepare" / key
    cacheable = not cfg.steering.vector and not cfg.tokens.path  # given files are used, not cached
    if cacheable and (cached / REPORT_FILE).is_file():
        return _reuse(cfg, cached, out_dir)

    torch.manual_seed(cfg.seed)
    model, tok = load_hf(model_path, "float32", cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    if torch.cuda.is_available():
        model.cuda()
    report: dict = {"model": model_path, "cache_key": key}
    sv = None
    if cfg.teacher.kind == "vector":
        sv, found = _steering_vector(cfg, model, tok, model_path)
        report.update(found)
        atomic_write_bytes(out_dir / VECTOR_FILE, S.vector_bytes(sv))
    st = _safety_tokens(cfg, model, tok, _reference_teacher(cfg, sv))
    atomic_write_json(out_dir / TOKENS_FILE, asdict(st))
    report["tokens"] = {
        "method": st.method,
        "k": len(st.ids),
        "student_mass": st.student_mass,
        "steered_mass": st.steered_mass,
        "top": st.strings[:20],
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    if cacheable:
        _store(out_dir, cached)
    del model
    return _prepared(cfg, out_dir, report)


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
