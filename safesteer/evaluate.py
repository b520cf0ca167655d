"""Evaluation: safety, over-refusal and capability, before and after distillation.

- Safety: refusal rate (offline judge, :mod:`safesteer.core.judge`) on the harmful sets.
- Over-refusal: refusal rate on benign sets (ordinary, coding, math, factual prompts) and on
  edgy-but-benign sets (prompts that sound harmful and are not), each reported separately, with
  the count of canned deflections (one refusal opening repeated across prompts).
- Capability: MMLU-subset accuracy (cloze: the log-likelihood of each answer's text, the form small
  models are evaluated with; or the answer letter); per-token KL(original || trained) and
  perplexity on the original model's answers to ordinary prompts; degenerate-answer rates.

Every evaluation set is checked against the run's training, anchor, direction and validation sets
(:func:`safesteer.data.held_out`); the report marks the sets that are not held out, and why.
Answers are generated greedily by vLLM (the rollout workers, before and after training); the
original model's answers are cached. The likelihood metrics run with transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer

from safesteer.core import judge
from safesteer.core.batch import collate
from safesteer.core.generation import chat_texts
from safesteer.core.scoring import _head_logits, right_padded_positions
from safesteer.data import held_out, load_prompts
from safesteer.errors import SafeSteerError
from safesteer.interrupts import STOP
from safesteer.models import (
    compute_dtype,
    default_device,
    fingerprint,
    load_hf,
    load_tokenizer,
    resolve_model_path,
)
from safesteer.paths import atomic_write_json, atomic_write_text, cache_dir
from safesteer.report import markdown, table_rows
from safesteer.rollout import RolloutWorker
from safesteer.schema import group, option, require, typed


@dataclass
class BarConfig:
    """``eval.bar``: the project's bar, checked in every report."""

    harmful_refusal: float = option(fraction="[]")
    benign_increase: float = option(fraction="[]")
    edgy_increase: float = option(fraction="[]")
    degenerate: float = option(fraction="[]")


@dataclass
class ClassifierConfig:
    """``eval.classifier``: an optional local safety classifier judge."""

    path: str | None = option()
    template: str = option(choices=("llamaguard", "harmbench"))
    max_new_tokens: int = option(ge=1)
    max_model_len: int = option(ge=2)


@dataclass
class EvalConfig:
    """``eval``: evaluation before and after distillation (conf/eval)."""

    enabled: bool = option()
    harmful_sets: list[str] = option(default=[])
    benign_sets: list[str] = option(default=[])
    edgy_sets: list[str] = option(default=[])
    max_prompts: int | None = option(ge=1)
    max_new_tokens: int = option(ge=1)
    capability_set: str = option()
    mmlu_set: str = option()
    n_mmlu: int | None = option(ge=1)
    mmlu_form: str = option(choices=("cloze", "letter"))
    bar: BarConfig = group(BarConfig)
    classifier: ClassifierConfig = group(ClassifierConfig)
    model: str | None = option()
    lm_eval_tasks: list[str] = option(default=[])

    @staticmethod
    def rules(cfg) -> None:
        e = cfg.eval
        named = [*e.harmful_sets, *e.benign_sets, *e.edgy_sets]
        twice = sorted({n for n in named if named.count(n) > 1})
        require(not twice, "eval.harmful_sets/benign_sets/edgy_sets", twice, "a set may be in one group only")
        require(len(e.harmful_sets) > 0, "eval.harmful_sets", list(e.harmful_sets), "needs at least one set")
        why = "must be one of the evaluation sets (eval.benign_sets)"
        require(e.capability_set in named, "eval.capability_set", e.capability_set, why)


log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
GROUPS = ("harmful", "benign", "edgy")


def set_groups(cfg) -> dict[str, str]:
    """Evaluation set name -> its group (harmful, benign or edgy), in report order."""
    e = cfg.eval
    return {
        **{n: "harmful" for n in e.harmful_sets},
        **{n: "benign" for n in e.benign_sets},
        **{n: "edgy" for n in e.edgy_sets},
    }


def eval_sets(cfg) -> dict[str, list[str]]:
    """The evaluation prompts by set name (at most ``eval.max_prompts`` each)."""
    return {n: [p.instruction for p in load_prompts(n, limit=cfg.eval.max_prompts)] for n in set_groups(cfg)}


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def fit_sets(cfg) -> dict[str, str]:
    """The run's training, anchor, direction and validation sets, by role (``data.train[1]`` ...)."""
    roles = [
        f"data.{k}"
        for k in ("train", "anchor", "direction_harmful", "direction_harmless", "val_harmful", "val_harmless")
    ]
    if not cfg.trainer.anchors_per_step:
        roles.remove("data.anchor")
    if cfg.trainer.select.every:
        roles += ["trainer.select.harmful", "trainer.select.harmless"]
    if cfg.tokens.method == "contrast" and not cfg.tokens.path:
        roles.append("tokens.harmful")
    if cfg.teacher.gate == "probe":
        roles += [f"probe.{k}" for k in ("harmful", "harmless", "val_harmful", "val_harmless")]
    out = {}
    for role in roles:
        items = _as_list(OmegaConf.select(cfg, role))
        for i, s in enumerate(items):
            out[role + (f"[{i}]" if len(items) > 1 else "")] = str(s)
    return out


def held_out_report(cfg) -> dict[str, list[str]]:
    """Per evaluation set (MMLU included): why it is not held out from this run ([] = held out)."""
    fits = fit_sets(cfg)
    return {n: held_out(n, fits) for n in [*set_groups(cfg), cfg.eval.mmlu_set]}


def generate_answers(
    greedy, tok, sets: dict[str, list[str]], max_new_tokens: int
) -> dict[str, list[list[int]]]:
    """Greedy answers by set. ``greedy(prompt_ids, max_tokens)`` is a rollout worker's ``greedy``
    (called in-process) or a Ray actor handle (its ``greedy.remote`` is used)."""
    names = list(sets)
    flat = [p for n in names for p in sets[n]]
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, flat)]
    if hasattr(greedy, "greedy"):  # a Ray actor handle
        ids = ray.get(greedy.greedy.remote(prompt_ids, max_new_tokens))
    else:
        ids = greedy(prompt_ids, max_new_tokens)
    out, i = {}, 0
    for n in names:
        out[n] = ids[i : i + len(sets[n])]
        i += len(sets[n])
    return out


def answers_cache_key(
    model_fingerprint: dict, sets: dict[str, list[str]], max_new_tokens: int, dtype: str
) -> str:
    """Key of the original model's greedy answers: the model, the prompts, the length and the dtype."""
    import vllm  # heavy: only the engine processes need vLLM

    blob = json.dumps(
        {
            "model": model_fingerprint,
            "sets": sets,
            "max_new_tokens": max_new_tokens,
            "dtype": dtype,
            "vllm": vllm.__version__,
            "version": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_answers(key: str) -> dict[str, list[list[int]]] | None:
    """The original model's answers cached under ``key`` (``$SAFESTEER_CACHE/eval``), or None."""
    path = cache_dir() / "eval" / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s: unreadable answer cache, generating again", path)
        return None


def cache_answers(key: str, ids: dict[str, list[list[int]]]) -> None:
    (cache_dir() / "eval").mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_dir() / "eval" / f"{key}.json", ids)


def original_answers(cfg, model_path: str, sets: dict[str, list[str]], generate, dtype: str) -> dict:
    """The original model's greedy answers: from the cache when the model, prompts, length and dtype
    are the same, else ``generate()`` (answers by set, see :func:`generate_answers`), then cached."""
    key = answers_cache_key(fingerprint(model_path), sets, cfg.eval.max_new_tokens, dtype)
    ids = cached_answers(key)
    if ids is not None and set(ids) == set(sets):
        log.info("evaluation: the original model's answers from the cache (%s)", key)
        return ids
    ids = generate()
    cache_answers(key, ids)
    return ids


def judge_sets(texts: dict[str, list[str]]) -> dict[str, dict]:
    return {name: judge.rates(ts) for name, ts in texts.items()}


def judge_answers(
    tok, sets: dict[str, list[str]], before_ids: dict, after_ids: dict | None, answers_path=None
) -> tuple[dict, dict | None, dict, dict | None]:
    """Decode and judge the answers before (and after); with ``answers_path``, every answer and its
    verdict is also written there (JSON lines, atomically). Returns decoded texts and rates."""

    def decode(ids: dict) -> dict[str, list[str]]:
        return {k: [tok.decode(x, skip_special_tokens=True) for x in v] for k, v in ids.items()}

    dec_b = decode(before_ids)
    dec_a = decode(after_ids) if after_ids is not None else None
    if answers_path is not None:
        recs = answer_records(sets, dec_b, dec_a)
        atomic_write_text(answers_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return dec_b, dec_a, judge_sets(dec_b), judge_sets(dec_a) if dec_a is not None else None


def side(rates: dict, decoded: dict[str, list[str]], groups: dict[str, str], mmlu: float, **more) -> dict:
    """One model's figures in a report: judge rates per set, their summary, canned deflections,
    MMLU, and any more (KL, perplexity, throughput)."""
    return {
        "sets": rates,
        **summary(rates, groups),
        "canned": judge.canned_deflections(decoded),
        "mmlu": mmlu,
        **more,
    }


def answer_records(
    sets: dict[str, list[str]], before: dict[str, list[str]], after: dict[str, list[str]] | None
) -> list[dict]:
    """One record per evaluation prompt: the answers before (and after) and the judge's verdicts,
    written to ``answers.jsonl`` so that every rate in the report can be audited answer by answer."""
    out = []
    for name, prompts in sets.items():
        for i, prompt in enumerate(prompts):
            rec = {"set": name, "prompt": prompt}
            for when, texts in (("before", before), ("after", after)):
                if texts is not None:
                    v = judge.judge(texts[name][i])
                    rec[when] = {"answer": texts[name][i], "label": v.label, "reason": v.reason}
            out.append(rec)
    return out


def mmlu_prompt(item) -> str:
    """The standard zero-shot MMLU format (plain text, as in lm-eval): question, options, ``Answer:``."""
    ex = item.extra
    options = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, ex["choices"]))
    return f"{item.instruction.strip()}\n{options}\nAnswer:"


@torch.no_grad()
def mmlu_letter_accuracy(model, tok, items: Sequence, batch_size: int = 16) -> float:
    """Zero-shot accuracy: argmax over the next-token log-likelihood of " A" .. " D"."""
    letter_ids = [tok(" " + letter, add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    correct = 0
    tok.padding_side = "left"
    for s in tqdm(range(0, len(items), batch_size), desc="MMLU (letter)", unit="batch", leave=False):
        chunk = items[s : s + batch_size]
        enc = tok(
            [mmlu_prompt(it) for it in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(**enc, position_ids=pos).logits[:, -1, letter_ids]
        pred = logits.argmax(-1).tolist()
        correct += sum(int(p == it.extra["answer"]) for p, it in zip(pred, chunk))
    return correct / max(len(items), 1)


@torch.no_grad()
def continuation_logprobs(
    model, tok, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 16
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair. The LM
    head runs only at the positions that predict a continuation token."""
    out: list[float] = []
    for s in range(0, len(contexts), batch_size):
        ctx = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts[s : s + batch_size]]
        cont = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations[s : s + batch_size]]
        b = collate(ctx, cont, tok.pad_token_id)
        lp = _completion_logprobs(model, b)
        lp = lp.gather(-1, b["input_ids"][:, 1:][b["completion_mask"].bool()].unsqueeze(-1)).squeeze(-1)
        i = 0
        for n in b["completion_lens"].tolist():
            out.append(float(lp[i : i + n].sum()))
            i += n
    return out


def _completion_logprobs(model, b: dict) -> torch.Tensor:
    """Full-vocabulary log-probs (N, V) at the completion positions of a collated batch, in order;
    the LM head runs at those positions only."""
    dev = model.device
    ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(
        input_ids=ids, attention_mask=mask, position_ids=right_padded_positions(mask)
    ).last_hidden_state
    sel = b["completion_mask"].bool().to(dev)  # (B, L-1): predicts a completion token
    return torch.log_softmax(_head_logits(model, hidden[:, :-1][sel]), -1).cpu()


@torch.no_grad()
def choice_logprobs(model, tok, context: str, choices: Sequence[str]) -> list[float]:
    """Sum of log p(choice tokens | context) for each choice: the context runs once, its KV cache is
    shared by the choices (equal to :func:`continuation_logprobs` on each pair)."""
    dev = model.device
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
    n, m, k = len(ctx), max(len(c) for c in conts), len(conts)
    out = model(input_ids=torch.tensor([ctx], device=dev), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts each choice's first token
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((k, m), pad, dtype=torch.long)
    mask = torch.zeros((k, n + m), dtype=torch.long)
    mask[:, :n] = 1
    for j, c in enumerate(conts):
        ids[j, : len(c)] = torch.tensor(c)
        mask[j, n : n + len(c)] = 1
    pos = torch.arange(n, n + m).unsqueeze(0).expand(k, -1)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), past_key_values=cache
    ).last_hidden_state
    lp = torch.log_softmax(_head_logits(model, hidden), -1)  # (k, m, V): position t predicts token t+1
    scores = []
    for j, c in enumerate(conts):
        total = float(first[c[0]])
        for t in range(1, len(c)):
            total += float(lp[j, t - 1, c[t]])
        scores.append(total)
    return scores


def mmlu_cloze_accuracy(model, tok, items: Sequence) -> float:
    """Zero-shot cloze accuracy: the choice whose text is most likely after ``Question: ...\nAnswer:``,
    its log-likelihood divided by its length in bytes (lm-eval's ``acc_norm``)."""
    correct = 0
    for it in tqdm(items, desc="MMLU (cloze)", unit="question", leave=False):
        conts = [" " + str(c).strip() for c in it.extra["choices"]]
        lps = choice_logprobs(model, tok, f"Question: {it.instruction.strip()}\nAnswer:", conts)
        scores = [lp / max(len(c.encode()), 1) for lp, c in zip(lps, conts)]
        correct += int(max(range(len(scores)), key=lambda j: scores[j]) == it.extra["answer"])
    return correct / max(len(items), 1)


def original_mmlu(cfg, model_path: str, model, tok, items: Sequence) -> float:
    """The original model's MMLU accuracy, cached like its answers (same model, items and form)."""
    blob = json.dumps(
        {
            "model": fingerprint(model_path),
            "items": [it.instruction for it in items],
            "form": cfg.eval.mmlu_form,
            "version": 1,
        },
        sort_keys=True,
    )
    path = cache_dir() / "eval" / f"mmlu-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    try:
        return float(json.loads(path.read_text())["accuracy"])
    except (OSError, ValueError, KeyError):
        pass
    acc = mmlu_accuracy(model, tok, items, cfg.eval.mmlu_form)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"accuracy": acc})
    return acc


def mmlu_accuracy(model, tok, items: Sequence, form: str = "cloze") -> float:
    return (
        mmlu_cloze_accuracy(model, tok, items) if form == "cloze" else mmlu_letter_accuracy(model, tok, items)
    )


def capability_totals(scored: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    """Per-token KL(original || trained) and both perplexities from batches of (original log-probs,
    trained log-probs, target ids): (N, V), (N, V), (N,) at the same answer positions."""
    kl_sum, nll_b, nll_t, n = 0.0, 0.0, 0.0, 0
    for lb, lt, targets in scored:
        kl_sum += float((lb.exp() * (lb - lt)).sum())
        nll_b -= float(lb.gather(-1, targets.unsqueeze(-1)).sum())
        nll_t -= float(lt.gather(-1, targets.unsqueeze(-1)).sum())
        n += len(targets)
    n = max(n, 1)
    return {
        "kl_per_token": kl_sum / n,
        "ppl_original": float(torch.exp(torch.tensor(nll_b / n))),
        "ppl_trained": float(torch.exp(torch.tensor(nll_t / n))),
        "tokens": n,
    }


@torch.no_grad()
def kl_and_perplexity(
    base, trained, tok, prompts: list[str], answers: list[list[int]], batch_size: int = 8
) -> dict:
    """Per-token KL(original || trained) and perplexities on the original model's answers, batched:
    both models score the same right-padded batch, and only completion positions are kept."""
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, prompts)]
    keep = [i for i, a in enumerate(answers) if a]

    def scored():
        for s in tqdm(range(0, len(keep), batch_size), desc="KL and perplexity", unit="batch", leave=False):
            rows = keep[s : s + batch_size]
            b = collate([prompt_ids[i] for i in rows], [answers[i] for i in rows], tok.pad_token_id)
            targets = b["input_ids"][:, 1:][b["completion_mask"].bool()]
            yield _completion_logprobs(base, b), _completion_logprobs(trained, b), targets

    return capability_totals(scored())


def summary(rates: dict[str, dict], groups: dict[str, str]) -> dict:
    """Headline numbers from per-set judge rates: mean refusal per group, degenerate rates pooled
    over the benign and edgy sets and over the harmful sets."""

    def mean(group: str, key: str = "refusal") -> float | None:
        xs = [rates[n][key] for n, g in groups.items() if g == group]
        return sum(xs) / len(xs) if xs else None

    def pooled(names: list[str]) -> float:
        n = sum(rates[x]["n"] for x in names)
        return sum(rates[x]["degenerate"] * rates[x]["n"] for x in names) / n if n else 0.0

    out = {
        "harmful_refusal_mean": mean("harmful"),
        "benign_refusal_mean": mean("benign"),
        "edgy_refusal_mean": mean("edgy"),
        "degenerate_benign": pooled([n for n, g in groups.items() if g != "harmful"]),
        "degenerate_harmful": pooled([n for n, g in groups.items() if g == "harmful"]),
    }
    unsafe = [rates[n]["unsafe"] for n, g in groups.items() if g == "harmful" and "unsafe" in rates[n]]
    if unsafe:
        out["harmful_unsafe_mean"] = sum(unsafe) / len(unsafe)
    return out


def bar(cfg, before: dict, after: dict, groups: dict[str, str]) -> dict:
    """The project's bar (``eval.bar``), item by item: the value, the limit and whether it is met."""
    b = cfg.eval.bar
    items = {
        "harmful refusal (mean)": (after["harmful_refusal_mean"], ">=", b.harmful_refusal),
    }
    for name, g in groups.items():
        if g in ("benign", "edgy"):
            limit = b.benign_increase if g == "benign" else b.edgy_increase
            rb = before["sets"][name]["refusal"]
            items[f"{name} refusal"] = (after["sets"][name]["refusal"], "<=", rb + limit)
    # degenerate answers to harmful prompts are not refusals (the harmful rate pays for them) and the
    # original model loops on many of them itself; the bar counts them on the benign and edgy sets
    items["degenerate (benign and edgy sets)"] = (after["degenerate_benign"], "<=", b.degenerate)
    out = {
        k: {"value": v, "limit": lim, "ok": (v >= lim - 1e-9) if op == ">=" else (v <= lim + 1e-9), "op": op}
        for k, (v, op, lim) in items.items()
    }
    return {"met": all(x["ok"] for x in out.values()), "items": out, "limits": dict(b)}


def classify(cfg, answers: list[dict[str, list[str]]], sets: dict[str, list[str]]) -> list[dict[str, dict]]:
    """The classifier judge (``eval.classifier.path``): one vLLM engine with the local classifier model
    labels every answer on the harmful sets as harmful or not. Returns per-set rates for each answer set."""
    c = cfg.eval.classifier
    path = resolve_model_path(c.path)
    ctok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    device = default_device()
    engine_cfg = dataclasses.replace(typed(cfg.rollout), max_model_len=c.max_model_len)
    dtype = compute_dtype(cfg.model.dtype, device)
    engine = RolloutWorker(path, engine_cfg, dtype, cfg.seed, device, cfg.model.trust_remote_code)
    try:
        return [classified(cfg, ctok, engine, texts, sets) for texts in answers]
    finally:
        engine.close()


def classified(cfg, ctok, engine, texts: dict[str, list[str]], sets: dict[str, list[str]]) -> dict[str, dict]:
    """One answer set's harmful-set rates under the classifier judge."""
    c = cfg.eval.classifier
    rates = {}
    for name in cfg.eval.harmful_sets:
        prompts = [judge.classifier_prompt(c.template, ctok, q, a) for q, a in zip(sets[name], texts[name])]
        ids = [ctok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        too_long = [len(x) for x in ids if len(x) + c.max_new_tokens > c.max_model_len]
        if too_long:
            raise SafeSteerError(
                f"eval.classifier.max_model_len={c.max_model_len}: a classifier prompt has {max(too_long)} tokens"
            )
        outputs = [ctok.decode(x, skip_special_tokens=True) for x in engine.greedy(ids, c.max_new_tokens)]
        rates[name] = judge.classifier_rates([judge.classifier_verdict(c.template, o) for o in outputs])
    return rates


def evaluate(
    cfg,
    base_path: str,
    trained_path: str | None,
    tok,
    before_ids: dict,
    after_ids: dict | None,
    sets: dict[str, list[str]],
    answers_path=None,
) -> dict:
    """Judge the answers and measure capability; returns ``{"before", "after", "examples", "held_out",
    "bar"}``. With ``answers_path``, every answer and its verdict is also written there (JSON lines,
    atomically)."""
    e = cfg.eval
    groups = set_groups(cfg)
    dec_b, dec_a, rates_b, rates_a = judge_answers(tok, sets, before_ids, after_ids, answers_path)
    if e.classifier.path:
        for rates, cls in zip([rates_b, rates_a], classify(cfg, [d for d in (dec_b, dec_a) if d], sets)):
            for name, r in cls.items():
                rates[name].update(r)
    mmlu = load_prompts(e.mmlu_set, limit=e.n_mmlu)
    base, _ = load_hf(base_path, trust_remote_code=cfg.model.trust_remote_code)
    out = {
        "groups": groups,
        "held_out": held_out_report(cfg),
        "before": side(rates_b, dec_b, groups, original_mmlu(cfg, base_path, base, tok, mmlu)),
    }
    if trained_path is not None and after_ids is not None:
        trained, _ = load_hf(trained_path, trust_remote_code=cfg.model.trust_remote_code)
        cap = kl_and_perplexity(base, trained, tok, sets[e.capability_set], before_ids[e.capability_set])
        out["after"] = side(rates_a, dec_a, groups, mmlu_accuracy(trained, tok, mmlu, e.mmlu_form), **cap)
        out["bar"] = bar(cfg, out["before"], out["after"], groups)
        out["examples"] = {k: list(zip(sets[k][:3], dec_b[k][:3], dec_a[k][:3])) for k in sets}
        if e.lm_eval_tasks:
            out["after"]["lm_eval"] = lm_eval_passthrough(trained_path, list(e.lm_eval_tasks))
            out["before"]["lm_eval"] = lm_eval_passthrough(base_path, list(e.lm_eval_tasks))
    return out


def lm_eval_passthrough(model_path: str, tasks: list[str]) -> dict:
    """Run EleutherAI lm-eval tasks on ``model_path`` (for clusters that have lm-eval and its datasets)."""
    try:
        import lm_eval  # optional: eval.lm_eval_tasks only
    except ImportError as e:
        raise SafeSteerError(
            "eval.lm_eval_tasks needs the lm-eval package (pip install lm-eval) and its datasets"
        ) from e
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path}", tasks=tasks)
    return {
        task: {k: v for k, v in m.items() if isinstance(v, (int, float))}
        for task, m in res["results"].items()
    }


def engine_answers(cfg, path: str, tok, sets: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """Greedy answers by set from a vLLM engine on the model at ``path`` (started, then shut down)."""
    device = default_device()
    dtype = compute_dtype(cfg.model.dtype, device)
    engine = RolloutWorker(path, typed(cfg.rollout), dtype, cfg.seed, device, cfg.model.trust_remote_code)
    try:
        return generate_answers(engine.greedy, tok, sets, cfg.eval.max_new_tokens)
    finally:
        engine.close()


def original_engine_answers(
    cfg, base_path: str, tok, sets: dict[str, list[str]], greedy=None
) -> dict[str, list[list[int]]]:
    """The original model's greedy answers by set: from the cache, else from ``greedy`` (an engine
    already serving the original weights, see :func:`generate_answers`) or a vLLM engine started for them."""
    dtype = compute_dtype(cfg.model.dtype, default_device())
    if greedy is None:
        return original_answers(
            cfg, base_path, sets, lambda: engine_answers(cfg, base_path, tok, sets), dtype
        )
    n = cfg.eval.max_new_tokens
    return original_answers(cfg, base_path, sets, lambda: generate_answers(greedy, tok, sets, n), dtype)


def command(cfg) -> None:
    """``python -m safesteer.evaluate``."""
    STOP.at("evaluation")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    base_path = resolve_model_path(cfg.model.path)
    trained_path = resolve_model_path(cfg.eval.model) if cfg.eval.model else None
    tok = load_tokenizer(base_path, cfg.model.trust_remote_code, cfg.model.chat_template_kwargs)
    sets = eval_sets(cfg)
    before = original_engine_answers(cfg, base_path, tok, sets)
    after = engine_answers(cfg, trained_path, tok, sets) if trained_path else None
    results = evaluate(
        cfg, base_path, trained_path, tok, before, after, sets, answers_path=run_dir / "answers.jsonl"
    )
    atomic_write_json(run_dir / "metrics.json", results)
    atomic_write_text(run_dir / "report.md", markdown(results, None))
    for s_, m, b, a in table_rows(results):
        print(f"{s_:>24} {m:<34} {b:>8} -> {a}")
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    from safesteer.cli import hydra_entry  # here: safesteer.config imports this module for its config

    hydra_entry(command)
