"""Inference-time baselines (safesteer.inference) on the tiny random Llama: the served model's answers
(a real vLLM CPU engine with the hook in its worker) are the HF model's greedy answers under the same
steering rule, every-position and prompt-only; the original is reproduced without a hook; the harm gate
steers exactly the flagged prompts; scoring steers the prompt as generation does."""

from __future__ import annotations

import torch
from procs import child_result

from safesteer import evaluate
from safesteer.core.generation import chat_texts, generate
from safesteer.core.probe import HarmProbe, last_token_states
from safesteer.core.steering import SteeringVector, steering
from safesteer.data import load_prompts
from safesteer.inference import Deployed, kl_and_perplexity

PROMPTS = ["How do I bake bread?", "Write a haiku about rain.", "Name three rivers.", "What is 7 times 8?"]


def vector(model, layer: int = 2, scale: float = 4.0) -> SteeringVector:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.config.hidden_size, generator=g) * scale
    return SteeringVector(vector=v, layer=layer, coeff=1.0, method="test")


def probe_for(model, tok) -> tuple[HarmProbe, torch.Tensor]:
    """A probe that flags two of the four prompts (those above the median score)."""
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, PROMPTS)]
    s = last_token_states(model, ids, [3])[3] @ direction
    return HarmProbe(direction, 3, float(s.median()), {}), s


# Runs in a child process (procs.child_result). Prints the engine's answers and the HF
# model's greedy answers under the same rule.
ENGINE_CHECK = r"""
import json, sys
sys.path.insert(0, "tests")
from test_inference import PROMPTS, probe_for, vector
from safesteer.config import compose
from safesteer.core.generation import chat_texts, generate
from safesteer.core.steering import steering
from safesteer.inference import Deployed, SteeringEngine, throughput
from safesteer.models import load_hf

path = sys.argv[1]
cfg = compose(["+experiment=smoke", f"model.path={path}"])
model, tok = load_hf(path)
v = vector(model)
system = "Refuse anything dangerous."
engine = SteeringEngine(cfg, path, v, len(tok(system)["input_ids"]))
texts = chat_texts(tok, PROMPTS)
res = {"engine": {}, "hf": {}}
for name, coeff, positions in (("plain", 0.0, "all"), ("all", 1.0, "all"), ("prompt", 1.0, "prompt")):
    res["engine"][name] = Deployed(model, tok, engine, v, coeff, positions).answer(PROMPTS, 10)
    if coeff:
        with steering(model, v.layer, v.vector, coeff, positions):
            res["hf"][name] = generate(model, tok, texts, 10)
    else:
        res["hf"][name] = generate(model, tok, texts, 10)
probe, s = probe_for(model, tok)
gated = Deployed(model, tok, engine, v, 1.0, "prompt", probe)
res["flags"] = gated.steered(PROMPTS)
res["engine"]["gated"] = gated.answer(PROMPTS, 10)
served = Deployed(model, tok, engine, system=system)
res["engine"]["system"] = served.answer(PROMPTS, 10)
res["hf"]["system"] = generate(model, tok, chat_texts(tok, PROMPTS, system), 10)
res["cost"] = throughput(Deployed(model, tok, engine, v, 1.0, "all"), PROMPTS, 6)
engine.close()
print("RESULT" + json.dumps(res))
"""


def test_the_engine_answers_as_the_hf_model_does_under_the_same_rule(tiny_model_dir) -> None:
    """A real vLLM CPU engine with the hook in its worker against HF greedy generation with the HF
    hook, on the same tiny Llama and vector: the same answers without a hook, with the vector at every
    position, on the prompt only, gated by the probe, and with a system prompt."""
    res = child_result(ENGINE_CHECK, str(tiny_model_dir))
    e, hf = res["engine"], res["hf"]
    for name in ("plain", "all", "prompt", "system"):
        assert e[name] == hf[name], name
    assert e["all"] != e["plain"] and e["prompt"] != e["plain"] and e["all"] != e["prompt"]
    flags = res["flags"]
    assert 0 < sum(flags) < 4
    assert e["gated"] == [a if f else n for a, n, f in zip(e["prompt"], e["plain"], flags)]
    assert res["cost"]["tokens_per_s_deployed"] > 0 and res["cost"]["tokens_per_s_original"] > 0


def test_without_a_hook_the_deployment_scores_as_the_original_model(tiny) -> None:
    model, tok = tiny
    plain = Deployed(model, tok)
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
    answers = generate(model, tok, chat_texts(tok, PROMPTS), 8)
    cap = kl_and_perplexity(plain, plain, PROMPTS, answers)
    assert abs(cap["kl_per_token"]) < 1e-6 and cap["ppl_original"] == cap["ppl_trained"]


def test_scoring_steers_the_prompt_as_generation_does(tiny) -> None:
    """The first answer token's distribution under the served model is the same whether it comes
    from generation (prefill with the hook) or from a scoring pass (the hook on the prompt positions)."""
    model, tok = tiny
    v = vector(model)
    served = Deployed(model, tok, None, v, coeff=1.0, positions="prompt")
    texts = chat_texts(tok, PROMPTS)
    first: list[torch.Tensor] = []
    with steering(model, v.layer, v.vector, 1.0, "prompt"):
        ids = generate(model, tok, texts, 4, batch_size=4, first_logprobs=first)
    ctx = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    lp = served.completion_logprobs(ctx, [x[:1] for x in ids], [True] * 4)
    assert torch.allclose(lp, first[0], atol=1e-4)
    plain = served.completion_logprobs(ctx, [x[:1] for x in ids], [False] * 4)
    assert (lp - plain).abs().max() > 1e-2  # the hook changes the distribution
    answers = generate(model, tok, texts, 8)
    cap = kl_and_perplexity(Deployed(model, tok), served, PROMPTS, answers)
    assert cap["kl_per_token"] > 1e-3


def test_the_harm_gate_flags_the_probe_s_prompts(tiny) -> None:
    model, tok = tiny
    probe, s = probe_for(model, tok)
    gated = Deployed(model, tok, None, vector(model), coeff=1.0, probe=probe, batch_size=2)
    assert gated.steered(PROMPTS) == (s > s.median()).tolist()
    assert Deployed(model, tok, None, system="Refuse anything dangerous.").steered(PROMPTS) == [False] * 4
