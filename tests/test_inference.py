"""Inference-time baselines (safesteer.inference) on the tiny random Llama: the served model's
generation and scoring apply the same steering rule, the original is reproduced exactly without a hook,
and the harm gate steers exactly the flagged prompts."""

from __future__ import annotations

import torch

from safesteer import evaluate
from safesteer.core.generation import chat_texts, generate
from safesteer.core.probe import HarmProbe, last_token_states
from safesteer.core.steering import SteeringVector, steering
from safesteer.data import load_prompts
from safesteer.inference import Deployed, kl_and_perplexity, throughput

PROMPTS = ["How do I bake bread?", "Write a haiku about rain.", "Name three rivers.", "What is 7 times 8?"]


def vector(model, layer: int = 2, scale: float = 4.0) -> SteeringVector:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.config.hidden_size, generator=g) * scale
    return SteeringVector(vector=v, layer=layer, coeff=1.0, method="test")


def test_without_a_hook_the_deployment_is_the_original_model(tiny) -> None:
    model, tok = tiny
    plain = Deployed(model, tok, batch_size=3)
    assert plain.answer(PROMPTS, 12) == generate(model, tok, chat_texts(tok, PROMPTS), 12)
    contexts = [f"Question: {p}\nAnswer:" for p in PROMPTS]
    conts = [" yes", " no thanks", " seven", " 56"]
    ref = evaluate.continuation_logprobs(model, tok, contexts, conts)
    ctx_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
    cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in conts]
    lp = plain.completion_logprobs(ctx_ids, cont_ids, [False] * 4)
    flat = torch.tensor([t for c in cont_ids for t in c]).unsqueeze(-1)
    got, i = [], 0
    for c in cont_ids:
        got.append(float(lp[i : i + len(c)].gather(-1, flat[i : i + len(c)]).sum()))
        i += len(c)
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), atol=1e-4)
    items = load_prompts("eval_mmlu", limit=8)
    assert plain.mmlu_cloze(items) == evaluate.mmlu_cloze_accuracy(model, tok, items)
    answers = plain.answer(PROMPTS, 8)
    cap = kl_and_perplexity(plain, plain, PROMPTS, answers)
    assert abs(cap["kl_per_token"]) < 1e-6 and cap["ppl_original"] == cap["ppl_trained"]


def test_scoring_steers_the_prompt_as_generation_does(tiny) -> None:
    """The first answer token's distribution under the served model is the same whether it comes
    from generation (prefill with the hook) or from a scoring pass (the hook on the prompt positions)."""
    model, tok = tiny
    v = vector(model)
    served = Deployed(model, tok, v, coeff=1.0, positions="prompt")
    texts = chat_texts(tok, PROMPTS)
    first: list[torch.Tensor] = []
    with steering(model, v.layer, v.vector, 1.0, "prompt"):
        ids = generate(model, tok, texts, 4, batch_size=4, first_logprobs=first)
    assert ids == served.answer(PROMPTS, 4)
    ctx = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    lp = served.completion_logprobs(ctx, [x[:1] for x in ids], [True] * 4)
    assert torch.allclose(lp, first[0], atol=1e-4)
    plain = served.completion_logprobs(ctx, [x[:1] for x in ids], [False] * 4)
    assert (lp - plain).abs().max() > 1e-2  # the hook changes the distribution
    assert served.answer(PROMPTS, 8) != Deployed(model, tok).answer(PROMPTS, 8)
    cap = kl_and_perplexity(Deployed(model, tok), served, PROMPTS, Deployed(model, tok).answer(PROMPTS, 8))
    assert cap["kl_per_token"] > 1e-3


def test_the_harm_gate_steers_exactly_the_flagged_prompts(tiny) -> None:
    model, tok = tiny
    v = vector(model)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, PROMPTS)]
    s = last_token_states(model, ids, [3])[3] @ direction
    probe = HarmProbe(direction, 3, float(s.median()), {})  # two prompts above the median, two not
    gated = Deployed(model, tok, v, coeff=1.0, probe=probe, batch_size=2)
    flags = gated.steered(PROMPTS)
    assert flags == (s > s.median()).tolist() and 0 < sum(flags) < 4
    got = gated.answer(PROMPTS, 8)
    always = Deployed(model, tok, v, coeff=1.0).answer(PROMPTS, 8)
    never = Deployed(model, tok).answer(PROMPTS, 8)
    assert got == [a if f else n for a, n, f in zip(always, never, flags)]
    assert always != never


def test_a_system_prompt_deployment_and_its_cost(tiny) -> None:
    model, tok = tiny
    served = Deployed(model, tok, system="Refuse anything dangerous.")
    texts = chat_texts(tok, PROMPTS, "Refuse anything dangerous.")
    assert served.answer(PROMPTS, 6) == generate(model, tok, texts, 6)
    assert served.steered(PROMPTS) == [False] * 4
    cost = throughput(served, PROMPTS, 6)
    assert cost["tokens_per_s_deployed"] > 0 and cost["tokens_per_s_original"] > 0
