"""Evaluation: safety, over-refusal and capability, before and after distillation.

- Safety: refusal rate (offline judge, :mod:`safesteer.core.judge`) on the bundled harmful sets.
- Over-refusal: refusal rate on edgy-but-benign prompts.
- Capability: zero-shot MMLU-subset accuracy by log-likelihood of the answer letters; per-token
  KL(original || trained) and perplexity on the original model's answers to ordinary prompts;
  degenerate-answer rate on ordinary prompts.

Answers are generated greedily by vLLM (the rollout workers, before and after training); the
likelihood metrics run with transformers on the original and the exported model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safesteer.core import judge
from safesteer.core.steering import chat_texts
from safesteer.data import load_prompts

LETTERS = ("A", "B", "C", "D")


def eval_sets(cfg) -> dict[str, list[str]]:
    """The evaluation prompts by set name (harmful sets, the edgy set and the benign set)."""
    e = cfg.eval
    sets = {name: [p.instruction for p in load_prompts(name, limit=e.n_harmful)] for name in e.harmful_sets}
    sets[e.edgy_set] = [p.instruction for p in load_prompts(e.edgy_set, limit=e.n_edgy)]
    sets[e.benign_set] = [p.instruction for p in load_prompts(e.benign_set, limit=e.n_benign)]
    return sets


def generate_answers(
    greedy, tok, sets: dict[str, list[str]], max_new_tokens: int
) -> dict[str, list[list[int]]]:
    """Greedy answers by set. ``greedy(prompt_ids, max_tokens)`` is a rollout worker's ``greedy``
    (called in-process) or a Ray actor handle (its ``greedy.remote`` is used)."""
    names = list(sets)
    flat = [p for n in names for p in sets[n]]
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, flat)]
    if hasattr(greedy, "greedy"):  # a Ray actor handle
        import ray

        ids = ray.get(greedy.greedy.remote(prompt_ids, max_new_tokens))
    else:
        ids = greedy(prompt_ids, max_new_tokens)
    out, i = {}, 0
    for n in names:
        out[n] = ids[i : i + len(sets[n])]
        i += len(sets[n])
    return out


def judge_sets(texts: dict[str, list[str]]) -> dict[str, dict]:
    return {name: judge.rates(ts) for name, ts in texts.items()}


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
def mmlu_accuracy(model, tok, items: Sequence, batch_size: int = 16) -> float:
    """Zero-shot accuracy: argmax over the next-token log-likelihood of " A" .. " D"."""
    letter_ids = [tok(" " + letter, add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    correct = 0
    tok.padding_side = "left"
    for s in range(0, len(items), batch_size):
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
def answer_logprobs(
    model, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int
) -> list[torch.Tensor]:
    """Full-vocabulary log-probs (n_i, V) over each answer's tokens."""
    from safesteer.core.batch import collate, completion_slice
    from safesteer.core.scoring import teacher_logprobs

    out = []
    for p, a in zip(prompt_ids, answer_ids):
        if not a:
            out.append(torch.zeros(0))
            continue
        b = collate([p], [a], pad_id)
        lp = teacher_logprobs(
            model, b["input_ids"].to(model.device), b["attention_mask"].to(model.device), "full"
        )
        out.append(completion_slice(lp["logprobs"].cpu(), b["prompt_lens"], b["completion_lens"])[0])
    return out


def kl_and_perplexity(base, trained, tok, prompts: list[str], answers: list[list[int]]) -> dict:
    """Per-token KL(original || trained) and perplexities on the original model's answers."""
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, prompts)]
    lb = answer_logprobs(base, prompt_ids, answers, tok.pad_token_id)
    lt = answer_logprobs(trained, prompt_ids, answers, tok.pad_token_id)
    kl_sum, nll_b, nll_t, n = 0.0, 0.0, 0.0, 0
    for b, t, a in zip(lb, lt, answers):
        if not a:
            continue
        idx = torch.tensor(a).unsqueeze(-1)
        kl_sum += float((b.exp() * (b - t)).sum())
        nll_b -= float(b.gather(-1, idx).sum())
        nll_t -= float(t.gather(-1, idx).sum())
        n += len(a)
    n = max(n, 1)
    return {
        "kl_per_token": kl_sum / n,
        "ppl_original": float(torch.exp(torch.tensor(nll_b / n))),
        "ppl_trained": float(torch.exp(torch.tensor(nll_t / n))),
        "tokens": n,
    }


def summary(rates: dict[str, dict], harmful_sets: Sequence[str], edgy: str, benign: str) -> dict:
    """Headline numbers from per-set judge rates."""
    harmful = [rates[n]["refusal"] for n in harmful_sets]
    out = {
        "harmful_refusal_mean": sum(harmful) / len(harmful),
        "edgy_refusal": rates[edgy]["refusal"],
        "edgy_preamble": rates[edgy]["preamble"],
        "benign_degenerate": rates[benign]["degenerate"],
        "benign_refusal": rates[benign]["refusal"],
    }
    unsafe = [rates[n]["unsafe"] for n in harmful_sets if "unsafe" in rates[n]]
    if unsafe:
        out["harmful_unsafe_mean"] = sum(unsafe) / len(unsafe)
    return out


def classify(cfg, answers: list[dict[str, list[str]]], sets: dict[str, list[str]]) -> list[dict[str, dict]]:
    """The classifier judge (``eval.classifier.path``): one vLLM engine with the local classifier model
    labels every answer on the harmful sets as harmful or not. Returns per-set rates for each answer set."""
    import gc

    from transformers import AutoTokenizer

    from safesteer.errors import SafeSteerError
    from safesteer.models import compute_dtype, resolve_model_path
    from safesteer.rollout import RolloutWorker

    c = cfg.eval.classifier
    path = resolve_model_path(c.path)
    ctok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine_cfg = {
        **dict(cfg.rollout),
        "dtype": compute_dtype(cfg.model.dtype, device),
        "max_model_len": c.max_model_len,
    }
    engine = RolloutWorker(path, engine_cfg, cfg.seed, device, cfg.model.trust_remote_code)
    out = []
    for texts in answers:
        rates = {}
        for name in cfg.eval.harmful_sets:
            prompts = [
                judge.classifier_prompt(c.template, ctok, q, a) for q, a in zip(sets[name], texts[name])
            ]
            ids = [ctok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            too_long = [len(x) for x in ids if len(x) + c.max_new_tokens > c.max_model_len]
            if too_long:
                raise SafeSteerError(
                    f"eval.classifier.max_model_len={c.max_model_len}: a classifier prompt has {max(too_long)} tokens"
                )
            outputs = [ctok.decode(x, skip_special_tokens=True) for x in engine.greedy(ids, c.max_new_tokens)]
            rates[name] = judge.classifier_rates([judge.classifier_verdict(c.template, o) for o in outputs])
        out.append(rates)
    del engine
    gc.collect()
    return out


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
    """Judge the answers and measure capability; returns ``{"before", "after", "examples"}``.
    With ``answers_path``, every answer and its verdict is also written there (JSON lines, atomically)."""
    import json

    from safesteer.models import load_hf
    from safesteer.paths import atomic_write_text

    e = cfg.eval
    decode = lambda ids: {k: [tok.decode(x, skip_special_tokens=True) for x in v] for k, v in ids.items()}  # noqa: E731
    dec_b = decode(before_ids)
    rates_b = judge_sets(dec_b)
    dec_a = decode(after_ids) if after_ids is not None else None
    rates_a = judge_sets(dec_a) if dec_a is not None else None
    if answers_path is not None:
        recs = answer_records(sets, dec_b, dec_a)
        atomic_write_text(answers_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    if e.classifier.path:
        for rates, cls in zip([rates_b, rates_a], classify(cfg, [d for d in (dec_b, dec_a) if d], sets)):
            for name, r in cls.items():
                rates[name].update(r)
    mmlu = load_prompts(e.mmlu_set, limit=e.n_mmlu)
    base, _ = load_hf(base_path, trust_remote_code=cfg.model.trust_remote_code)
    out = {
        "before": {
            "sets": rates_b,
            **summary(rates_b, e.harmful_sets, e.edgy_set, e.benign_set),
            "mmlu": mmlu_accuracy(base, tok, mmlu),
        }
    }
    if trained_path is not None and after_ids is not None:
        trained, _ = load_hf(trained_path, trust_remote_code=cfg.model.trust_remote_code)
        cap = kl_and_perplexity(base, trained, tok, sets[e.benign_set], before_ids[e.benign_set])
        out["after"] = {
            "sets": rates_a,
            **summary(rates_a, e.harmful_sets, e.edgy_set, e.benign_set),
            "mmlu": mmlu_accuracy(trained, tok, mmlu),
            **cap,
        }
        out["examples"] = {k: list(zip(sets[k][:3], dec_b[k][:3], dec_a[k][:3])) for k in sets}
        if e.lm_eval_tasks:
            out["after"]["lm_eval"] = lm_eval_passthrough(trained_path, list(e.lm_eval_tasks))
            out["before"]["lm_eval"] = lm_eval_passthrough(base_path, list(e.lm_eval_tasks))
    return out


def lm_eval_passthrough(model_path: str, tasks: list[str]) -> dict:
    """Run EleutherAI lm-eval tasks on ``model_path`` (for clusters that have lm-eval and its datasets)."""
    from safesteer.errors import SafeSteerError

    try:
        import lm_eval
    except ImportError as e:
        raise SafeSteerError(
            "eval.lm_eval_tasks needs the lm-eval package (pip install lm-eval) and its datasets"
        ) from e
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path}", tasks=tasks)
    return {
        task: {k: v for k, v in m.items() if isinstance(v, (int, float))}
        for task, m in res["results"].items()
    }


def _main(cfg) -> None:
    import gc
    import json
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from transformers import AutoTokenizer

    from safesteer.models import compute_dtype, resolve_model_path
    from safesteer.paths import atomic_write_json
    from safesteer.report import markdown
    from safesteer.rollout import RolloutWorker

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    base_path = resolve_model_path(cfg.model.path)
    trained_path = resolve_model_path(cfg.eval.model) if cfg.eval.model else None
    tok = AutoTokenizer.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code)
    sets = eval_sets(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rollout_cfg = {**dict(cfg.rollout), "dtype": compute_dtype(cfg.model.dtype, device)}
    answers = []
    for path in [base_path] + ([trained_path] if trained_path else []):
        engine = RolloutWorker(path, rollout_cfg, cfg.seed, device, cfg.model.trust_remote_code)
        answers.append(generate_answers(engine.greedy, tok, sets, cfg.eval.max_new_tokens))
        del engine
        gc.collect()
    after = answers[1] if trained_path else None
    results = evaluate(
        cfg, base_path, trained_path, tok, answers[0], after, sets, answers_path=run_dir / "answers.jsonl"
    )
    atomic_write_json(run_dir / "metrics.json", results)
    from safesteer.paths import atomic_write_text

    atomic_write_text(run_dir / "report.md", markdown(results, None))
    print(
        json.dumps(
            {k: {m: v for m, v in r.items() if m != "sets"} for k, r in results.items() if k != "examples"},
            indent=1,
        )
    )


def main() -> None:
    from safesteer.config import hydra_entry

    hydra_entry(_main)


if __name__ == "__main__":
    main()
