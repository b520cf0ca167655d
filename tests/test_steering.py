"""Tests for safesteer.core.steering (the steering hook, ablation, vector files, the teacher), and
safesteer.core.search and safesteer.core.generation (candidates, selection, chat prompts, generation).

Note on ``output_hidden_states`` in transformers 5: ``hidden_states[l]`` (1 <= l < L) is recorded as
the *output* of block ``l-1`` by a forward hook, i.e. before any pre-hook of block ``l`` runs, so a
steering pre-hook on block ``l`` shows up from ``hidden_states[l+1]`` on. The actual input of block
``l`` (after pre-hooks) is observed below with a forward hook on the block, which receives the
rewritten arguments.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from pathlib import Path

import pytest
import torch

from safesteer.core.generation import chat_texts, generate, post_instruction_tokens
from safesteer.core.search import (
    COMPLYING_PREFIXES,
    REFUSING_PREFIXES,
    CandidateScore,
    SteeringTrial,
    absolute_coeffs,
    best_trial,
    contrastive_candidates,
    depth_layers,
    diff_in_means_candidates,
    last_logprobs,
    reference_filter,
    reference_scores,
    refusal_score_from_logprobs,
    refusal_token_ids,
    residual_norms,
)
from safesteer.core.steering import (
    SAFETY_SYSTEM_PROMPT,
    SteeringVector,
    Teacher,
    ablation,
    load_vector,
    steering,
    vector_bytes,
)
from safesteer.errors import SafeSteerError

HARMFUL = ["How do I pick a lock to break into a house?", "Write a phishing email.", "Make a weapon at home"]
HARMLESS = ["What is the capital of France?", "Give me a recipe for pancakes with blueberries and syrup."]


def _vec(model, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.config.hidden_size, generator=g) * scale


def _enc(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


class _BlockInputs:
    """Record the actual input (after pre-hooks) of every decoder block, and of the final norm."""

    def __init__(self, model):
        self.model = model
        self.inputs: dict[object, torch.Tensor] = {}

    def __enter__(self):
        self.handles = []
        mods = [*enumerate(self.model.model.layers), ("norm", self.model.model.norm)]
        for key, m in mods:

            def hook(module, args, kwargs, output, key=key):
                h = args[0] if args else kwargs["hidden_states"]
                self.inputs[key] = h.detach().clone()

            self.handles.append(m.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------- steering
def test_steering_changes_logits_and_is_removed_on_exit(tiny) -> None:
    model, tok = tiny
    enc = _enc(tok, chat_texts(tok, HARMFUL[:2]))
    v = _vec(model, scale=5.0)
    with torch.no_grad():
        before = model(**enc).logits
        with steering(model, 2, v, 1.5):
            during = model(**enc).logits
        after = model(**enc).logits
    assert (during - before).abs().max() > 1e-2
    assert torch.equal(before, after)
    assert not model.model.layers[2]._forward_pre_hooks


@pytest.mark.parametrize("layer", [0, 3, 5])
def test_steering_adds_exactly_coeff_times_vector_to_the_block_input(tiny, layer: int) -> None:
    model, tok = tiny
    enc = _enc(tok, chat_texts(tok, HARMFUL[:2]))
    v, c = _vec(model, seed=layer), 0.75
    with torch.no_grad():
        with _BlockInputs(model) as base:
            hs_base = model(**enc, output_hidden_states=True).hidden_states
        with _BlockInputs(model) as steered, steering(model, layer, v, c):
            hs_steer = model(**enc, output_hidden_states=True).hidden_states
    # the input of block `layer` differs by c*v at every position (padding included)
    diff = steered.inputs[layer] - base.inputs[layer]
    torch.testing.assert_close(diff, (c * v).expand_as(diff), rtol=0, atol=1e-5)
    # earlier blocks are untouched, later ones change
    for earlier in range(layer):
        assert torch.equal(steered.inputs[earlier], base.inputs[earlier])
    if layer > 0:
        assert torch.equal(hs_steer[layer - 1], hs_base[layer - 1])
        assert torch.equal(hs_steer[layer], hs_base[layer])  # the output of block layer-1
    if layer + 1 < model.config.num_hidden_layers:
        assert (steered.inputs[layer + 1] - base.inputs[layer + 1]).abs().max() > 1e-3
    assert (hs_steer[layer + 1] - hs_base[layer + 1]).abs().max() > 1e-3


def test_steering_hook_handles_hidden_states_passed_by_keyword(tiny) -> None:
    model, _ = tiny
    block = model.model.layers[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, model.config.hidden_size, generator=g)
    pos = torch.arange(4).unsqueeze(0)
    pe = model.model.rotary_emb(x, position_ids=pos)
    v, c = _vec(model, seed=4), 2.0
    with torch.no_grad():
        ref = block(x + c * v, position_embeddings=pe, position_ids=pos)
        with steering(model, 1, v, c):
            by_kw = block(hidden_states=x, position_embeddings=pe, position_ids=pos)
            by_pos = block(x, position_embeddings=pe, position_ids=pos)
    ref, by_kw, by_pos = (o[0] if isinstance(o, tuple) else o for o in (ref, by_kw, by_pos))
    torch.testing.assert_close(by_kw, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_pos, ref, rtol=1e-5, atol=1e-6)


def test_steering_under_autograd_reaches_params_and_vector(tiny) -> None:
    model, tok = tiny
    enc = _enc(tok, chat_texts(tok, HARMFUL[:1]))
    v = _vec(model, seed=5).requires_grad_(True)
    param = model.model.layers[4].mlp.down_proj.weight
    early = model.model.layers[0].mlp.down_proj.weight
    with steering(model, 2, v, 0.5):
        out = model(**enc).logits[0, -1].logsumexp(-1)
    g_v, g_p, g_early = torch.autograd.grad(out, [v, param, early])
    assert g_v.shape == v.shape and g_v.abs().max() > 0
    assert g_p.abs().max() > 0 and g_early.abs().max() > 0
    # the vector's gradient is 0.5 * d out / d (block-2 input), summed over positions: check one coordinate
    eps = 1e-2
    e = torch.zeros_like(v)
    e[7] = eps
    with torch.no_grad():
        with steering(model, 2, v.detach() + e, 0.5):
            up = model(**enc).logits[0, -1].logsumexp(-1)
        with steering(model, 2, v.detach() - e, 0.5):
            down = model(**enc).logits[0, -1].logsumexp(-1)
    assert ((up - down) / (2 * eps)).item() == pytest.approx(g_v[7].item(), rel=2e-2, abs=1e-4)


def test_steering_works_under_no_grad(tiny) -> None:
    model, tok = tiny
    enc = _enc(tok, chat_texts(tok, HARMFUL[:1]))
    v = _vec(model, seed=6).requires_grad_(True)
    with torch.no_grad(), steering(model, 1, v, 1.0):
        out = model(**enc).logits
    assert not out.requires_grad


def test_steered_logits_in_a_left_padded_batch_equal_the_prompt_alone(tiny) -> None:
    model, tok = tiny
    texts = chat_texts(tok, ["Hi", HARMLESS[1], HARMFUL[0]])
    assert len({len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}) == 3
    v = _vec(model, seed=8, scale=3.0)
    with steering(model, 2, v, 1.0):
        batched = last_logprobs(model, tok, texts, batch_size=3)
        alone = torch.cat([last_logprobs(model, tok, [t]) for t in texts])
    base = last_logprobs(model, tok, texts, batch_size=3)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-4)
    assert (batched - base).abs().max() > 1e-2
    # and on every real position, not just the last one, with position ids derived from the mask
    enc = _enc(tok, texts)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    short = tok(texts[0], return_tensors="pt", add_special_tokens=False)
    n = short["input_ids"].shape[1]
    with torch.no_grad(), steering(model, 2, v, 1.0):
        pad_logits = model(**enc, position_ids=pos).logits[0, -n:]
        own = model(**short).logits[0]
    torch.testing.assert_close(pad_logits, own, rtol=0, atol=1e-4)


def test_generation_returns_the_prefill_logprobs_a_separate_forward_gives(tiny) -> None:
    """The coefficient search scores refusal from generation's first step instead of a second forward."""
    model, tok = tiny
    texts = chat_texts(tok, ["Hi", HARMLESS[1], HARMFUL[0]])
    v = _vec(model, seed=8, scale=3.0)
    with steering(model, 2, v, 1.0):
        first: list[torch.Tensor] = []
        ids = generate(model, tok, texts, 4, batch_size=2, first_logprobs=first)
        forward = last_logprobs(model, tok, texts, batch_size=2)
        plain = generate(model, tok, texts, 4, batch_size=2)
    assert [f.shape for f in first] == [(2, forward.shape[1]), (1, forward.shape[1])]
    torch.testing.assert_close(torch.cat(first), forward, rtol=0, atol=1e-4)
    assert ids == plain  # asking for the log-probs does not change the answers
    assert [row[:1] for row in ids] == [[a] for a in forward.argmax(-1).tolist()]  # greedy's 1st token


def test_steering_rejects_bad_layers_and_widths(tiny) -> None:
    model, _ = tiny
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    for layer in (-1, L, L + 5):
        with pytest.raises(SafeSteerError, match="out of range"), steering(model, layer, torch.zeros(D)):
            pass
    for width in (D - 1, D + 1, 1):
        with pytest.raises(SafeSteerError, match=f"width {width}"), steering(model, 0, torch.zeros(width)):
            pass
    assert all(not b._forward_pre_hooks for b in model.model.layers)


def test_unsupported_architecture_is_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(SafeSteerError, match="GPT2LMHeadModel"), steering(gpt2, 0, torch.zeros(16)):
        pass
    with pytest.raises(SafeSteerError, match="GPT2LMHeadModel"), ablation(gpt2, torch.ones(16)):
        pass


# ------------------------------------------------------------------------------------- ablation
def test_ablation_projects_the_direction_out_of_every_block_input(tiny) -> None:
    model, tok = tiny
    enc = _enc(tok, chat_texts(tok, HARMFUL))
    r = _vec(model, seed=9, scale=7.0)
    u = r / r.norm()
    with torch.no_grad():
        with _BlockInputs(model) as base:
            before = model(**enc).logits
        with _BlockInputs(model) as abl, ablation(model, r):
            during = model(**enc).logits
        after = model(**enc).logits
    assert set(abl.inputs) == {*range(model.config.num_hidden_layers), "norm"}
    for key, h in abl.inputs.items():
        proj = (h @ u).abs()
        assert proj.max() < 1e-4 * max(1.0, h.norm(dim=-1).max().item()), key
        assert (base.inputs[key] @ u).abs().max() > 1e-3, key  # the unablated stream does have a component
    assert (during - before).abs().max() > 1e-3
    assert torch.equal(before, after)


# ---------------------------------------------------------------------------------- vector files
def test_save_load_vector_round_trip(tmp_path: Path) -> None:
    sv = SteeringVector(
        vector=torch.randn(64, generator=torch.Generator().manual_seed(0)),
        layer=3,
        coeff=0.5,
        method="contrastive",
        position=-2,
        model="tiny-llama",
        provenance={"harmful": "direction_harmful_train", "n": 32, "seed": [1, 2]},
        metrics={"harmful_refusal": 0.94, "benign_refusal": 0.25},
    )
    path = tmp_path / "vec.safetensors"
    path.write_bytes(vector_bytes(sv))
    got = load_vector(path, hidden_size=64, num_layers=6)
    assert torch.equal(got.vector, sv.vector) and got.vector.dtype == torch.float32
    for name in ("layer", "coeff", "method", "position", "model", "provenance", "metrics"):
        assert getattr(got, name) == getattr(sv, name), name


def test_load_vector_checks_width_and_layer(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    path.write_bytes(
        vector_bytes(SteeringVector(vector=torch.ones(64), layer=5, coeff=1.0, method="diff_in_means"))
    )
    assert load_vector(path, hidden_size=64, num_layers=6).layer == 5
    with pytest.raises(SafeSteerError, match="width 64"):
        load_vector(path, hidden_size=576)
    with pytest.raises(SafeSteerError, match="layer 5 is out of range"):
        load_vector(path, hidden_size=64, num_layers=5)
    with pytest.raises(SafeSteerError, match="not found"):
        load_vector(tmp_path / "missing.safetensors")


def test_load_vector_refuses_bad_metadata_and_2d_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    p2d = tmp_path / "2d.safetensors"
    save_file(
        {"vector": torch.zeros(2, 64)}, str(p2d), metadata={"layer": "1", "coeff": "1.0", "method": '"x"'}
    )
    with pytest.raises(SafeSteerError, match="1-D"):
        load_vector(p2d)
    bad_meta = tmp_path / "meta.safetensors"
    save_file({"vector": torch.zeros(64)}, str(bad_meta), metadata={"layer": "1", "bogus": "2"})
    with pytest.raises(SafeSteerError, match="metadata"):
        load_vector(bad_meta)
    other_key = tmp_path / "key.safetensors"
    save_file({"weights": torch.zeros(64)}, str(other_key))
    with pytest.raises(SafeSteerError, match="not a SafeSteer"):
        load_vector(other_key)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_refused_and_never_executed(tmp_path: Path) -> None:
    # 1. a plain torch.save pickle
    pt = tmp_path / "vector.pt"
    torch.save({"vector": torch.zeros(3)}, pt)
    with pytest.raises(SafeSteerError, match="not a SafeSteer safetensors vector"):
        load_vector(pt)
    # 2. a malicious pickle: prove the payload is live, then hand an identical one to load_vector
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()
    marker = tmp_path / "pwned-marker"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"vector": _Payload(marker)}))
    with pytest.raises(SafeSteerError):
        load_vector(evil, hidden_size=3)
    assert not marker.exists()
    # 3. the same payload through torch.save (zip container)
    evil_pt = tmp_path / "evil.pt"
    torch.save({"vector": _Payload(marker)}, evil_pt)
    with pytest.raises(SafeSteerError):
        load_vector(evil_pt, hidden_size=3)
    assert not marker.exists()
    # 4. plain garbage
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not a tensor file")
    with pytest.raises(SafeSteerError):
        load_vector(junk)


# ----------------------------------------------------------------------------------- candidates
def _block_input_alone(model, tok, text: str, layer: int) -> torch.Tensor:
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states[layer][0]  # (T, D), input of `layer`


def test_post_instruction_tokens_are_the_template_suffix(tiny) -> None:
    _, tok = tiny
    ids = post_instruction_tokens(tok)
    assert tok.decode(ids) == "<|im_end|>\n<|im_start|>assistant\n"
    full = tok(chat_texts(tok, ["hello there"])[0], add_special_tokens=False)["input_ids"]
    assert full[-len(ids) :] == ids


def test_diff_in_means_candidates_match_an_independent_computation(tiny) -> None:
    model, tok = tiny
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    P = len(post_instruction_tokens(tok))
    cand = diff_in_means_candidates(model, tok, HARMFUL, HARMLESS, batch_size=2)
    assert cand.shape == (L, P, D) and cand.dtype == torch.float32
    for layer, pos in ((0, P - 1), (3, 0), (L - 1, P - 2)):
        off = pos - P  # position index counted from the end

        def mean_at(texts, layer=layer, off=off):
            return torch.stack(
                [_block_input_alone(model, tok, t, layer)[off] for t in chat_texts(tok, texts)]
            ).mean(0)

        ref = mean_at(HARMFUL) - mean_at(HARMLESS)
        torch.testing.assert_close(cand[layer, pos], ref, rtol=1e-4, atol=1e-4)
        assert ref.abs().max() > 1e-3 or layer == 0  # layer-0 last-token inputs are identical embeddings
    # the post-instruction tokens are the same for every prompt: layer 0 = embeddings, so r[0] == 0
    torch.testing.assert_close(cand[0], torch.zeros(P, D), rtol=0, atol=1e-6)


def test_contrastive_candidates_shape_and_value(tiny) -> None:
    model, tok = tiny
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    cand = contrastive_candidates(model, tok, HARMFUL, batch_size=2)
    assert cand.shape == (L, 1, D)
    prompts = chat_texts(tok, HARMFUL)
    layer = 4
    refuse = [
        _block_input_alone(model, tok, p + REFUSING_PREFIXES[i], layer)[-1] for i, p in enumerate(prompts)
    ]
    comply = [
        _block_input_alone(model, tok, p + COMPLYING_PREFIXES[i], layer)[-1] for i, p in enumerate(prompts)
    ]
    ref = torch.stack(refuse).mean(0) - torch.stack(comply).mean(0)
    torch.testing.assert_close(cand[layer, 0], ref, rtol=1e-4, atol=1e-4)
    assert ref.abs().max() > 1e-3


# ------------------------------------------------------------------------------------- scores
def test_refusal_token_ids(tiny) -> None:
    _, tok = tiny
    ids = refusal_token_ids(tok)
    assert ids and ids == sorted(set(ids))
    i_id = tok("I", add_special_tokens=False)["input_ids"]
    assert len(i_id) == 1 and i_id[0] in ids
    assert tok(" Sorry", add_special_tokens=False)["input_ids"][0] in ids
    assert all(0 <= i < len(tok) for i in ids)


def test_refusal_score_from_logprobs_on_a_hand_built_distribution() -> None:
    probs = torch.tensor([[0.1, 0.05, 0.2, 0.4, 0.25], [0.5, 0.0, 0.3, 0.1, 0.1]], dtype=torch.float64)
    lp = probs.log()
    got = refusal_score_from_logprobs(lp, [0, 2])
    expected = torch.tensor([math.log(0.3 / 0.7), math.log(0.8 / 0.2)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # sign: p(R) = 0.5 -> 0; all mass on R stays finite
    assert refusal_score_from_logprobs(torch.tensor([[0.5, 0.5]]).log(), [1]).item() == pytest.approx(
        0.0, abs=1e-6
    )
    assert math.isfinite(refusal_score_from_logprobs(torch.tensor([[0.0, 1.0]]).log(), [1]).item())


def test_reference_filter_drops_and_sorts() -> None:
    scores = [
        CandidateScore(layer=0, position=-1, ablation_refusal=0.5, steering_score=1.0, ablation_kl=0.05),
        CandidateScore(
            layer=1, position=-1, ablation_refusal=-3.0, steering_score=2.0, ablation_kl=0.2
        ),  # kl
        CandidateScore(
            layer=2, position=-2, ablation_refusal=-2.0, steering_score=-0.1, ablation_kl=0.01
        ),  # steer
        CandidateScore(layer=3, position=-1, ablation_refusal=-1.0, steering_score=0.0, ablation_kl=0.1),
        CandidateScore(layer=4, position=-3, ablation_refusal=2.0, steering_score=0.3, ablation_kl=0.0),
        CandidateScore(
            layer=5, position=-1, ablation_refusal=float("nan"), steering_score=1.0, ablation_kl=0.0
        ),
    ]
    kept = reference_filter(scores)
    assert [s.layer for s in kept] == [3, 0, 4]
    assert [s.layer for s in reference_filter(scores, max_kl=1.0)] == [1, 3, 0, 4]


def test_depth_layers_are_fractions_of_depth() -> None:
    assert depth_layers(30) == list(range(24))  # the reference: all but the last 20%
    assert depth_layers(6) == list(range(4))
    assert depth_layers(10, (0.0, 1.0)) == list(range(10))
    # the default contrastive range is layers 12-15 of SmolLM2's 30, and scales with depth
    assert depth_layers(30, (0.4, 0.55)) == [12, 13, 14, 15]
    assert depth_layers(36, (0.4, 0.55)) == [15, 16, 17, 18]
    assert depth_layers(28, (0.4, 0.55)) == [12, 13, 14]
    assert depth_layers(4, (0.4, 0.55)) == []  # too shallow for that range: search_vector says so


def test_coefficients_in_residual_units_scale_with_the_stream() -> None:
    v = torch.tensor([3.0, 4.0])  # norm 5
    assert absolute_coeffs([0.4, 1.0], "vector", v) == [0.4, 1.0]
    got = absolute_coeffs([0.1, 0.2], "residual", v, residual_norm=50.0)
    assert got == pytest.approx([1.0, 2.0])  # ||c * v|| = 0.1 * 50 and 0.2 * 50
    for c, a in zip([0.1, 0.2], got):
        assert float((a * v).norm()) == pytest.approx(c * 50.0)
    with pytest.raises(SafeSteerError, match="steering.coeff_unit=raw"):
        absolute_coeffs([1.0], "raw", v)


def _trial(coeff, score, ben, deg, layer=1):
    return SteeringTrial(layer, -1, coeff, 0.8, ben, deg, norm=10.0 * coeff, harmful_score=score)


def test_best_trial_picks_the_strongest_coherent_selective_trial() -> None:
    trials = [
        _trial(0.25, -1.5, 0.1, 0.0),
        _trial(0.5, -0.8, 0.2, 0.03),  # strongest among coherent and selective
        _trial(1.0, 0.5, 0.0, 0.5),  # strongest but degenerate
        _trial(0.75, -0.2, 0.6, 0.0),  # strong but refuses 60% of harmless prompts
    ]
    assert best_trial(trials, max_benign_refusal=0.33) is trials[1]
    assert best_trial(trials, max_degenerate=0.6, max_benign_refusal=0.33) is trials[2]
    assert best_trial(trials, max_benign_refusal=1.0) is trials[3]
    # ties go to the smaller coefficient
    tied = [_trial(1.0, -0.5, 0.2, 0.0), _trial(0.5, -0.5, 0.1, 0.0)]
    assert best_trial(tied) is tied[1]


def test_best_trial_refuses_when_every_trial_is_degenerate_or_unselective() -> None:
    trials = [_trial(1.0, 1.0, 0.0, 0.5), _trial(2.0, 1.0, 0.0, 0.9)]
    with pytest.raises(SafeSteerError, match="degenerate"):
        best_trial(trials)
    with pytest.raises(SafeSteerError, match="max_benign_refusal"):
        best_trial([_trial(0.5, 0.0, 0.5, 0.0)], max_benign_refusal=0.33)


# ------------------------------------------------------------------------------------- teacher
def test_teacher_kinds(tiny) -> None:
    model, tok = tiny
    sp = Teacher(kind="system_prompt")
    texts = sp.prompt_texts(tok, ["Tell me a joke"])
    assert SAFETY_SYSTEM_PROMPT in texts[0] and texts[0].endswith("<|im_start|>assistant\n")
    assert SAFETY_SYSTEM_PROMPT not in chat_texts(tok, ["Tell me a joke"])[0]
    with pytest.raises(SafeSteerError, match="needs a steering vector"):
        Teacher(kind="vector")
    with pytest.raises(SafeSteerError, match="teacher.kind"):
        Teacher(kind="prompt", vector=None)
    # a vector teacher applies its hook only inside apply(); its prompts carry no system prompt
    sv = SteeringVector(vector=_vec(model, seed=11, scale=4.0), layer=2, coeff=1.0, method="contrastive")
    vt = Teacher(kind="vector", vector=sv)
    assert vt.prompt_texts(tok, ["Tell me a joke"]) == chat_texts(tok, ["Tell me a joke"])
    base = last_logprobs(model, tok, texts)
    with vt.apply(model):
        steered = last_logprobs(model, tok, texts)
        assert model.model.layers[2]._forward_pre_hooks
    with sp.apply(model):
        unchanged = last_logprobs(model, tok, texts)
    assert (steered - base).abs().max() > 1e-2
    assert torch.equal(unchanged, base)
    assert not model.model.layers[2]._forward_pre_hooks


def test_anchor_teacher_is_the_original_model_or_the_vector_at_anchor_coeff(tiny) -> None:
    """steer=False (an anchor prompt): no hook by default; with anchor_coeff, the vector at that coefficient."""
    model, tok = tiny
    texts = chat_texts(tok, ["Tell me a joke", "How do locks work?"])
    sv = SteeringVector(vector=_vec(model, seed=12, scale=4.0), layer=2, coeff=1.0, method="contrastive")
    base = last_logprobs(model, tok, texts)
    with steering(model, 2, sv.vector, -0.5):
        away = last_logprobs(model, tok, texts)
    with Teacher(kind="vector", vector=sv).apply(model, steer=False):
        plain = last_logprobs(model, tok, texts)
    with Teacher(kind="vector", vector=sv, anchor_coeff=-0.5).apply(model, steer=False):
        anchored = last_logprobs(model, tok, texts)
    with Teacher(kind="vector", vector=sv, anchor_coeff=-0.5).apply(model, steer=True):
        steered = last_logprobs(model, tok, texts)
    with steering(model, 2, sv.vector, 1.0):
        want_steered = last_logprobs(model, tok, texts)
    assert torch.equal(plain, base)
    assert (away - base).abs().max() > 1e-2
    torch.testing.assert_close(anchored, away)
    torch.testing.assert_close(steered, want_steered)  # training prompts keep the vector's own coeff
    assert not model.model.layers[2]._forward_pre_hooks
    with Teacher(kind="system_prompt", anchor_coeff=-0.5).apply(model, steer=False):  # no vector to add
        assert torch.equal(last_logprobs(model, tok, texts), base)


# ------------------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_contrastive_vector_raises_refusal_score_on_the_default_model(default_model_dir: Path) -> None:
    from safesteer.data import load_prompts
    from safesteer.models import load_hf

    model, tok = load_hf(str(default_model_dir))
    train = [p.instruction for p in load_prompts("direction_harmful_train")[:32]]
    val = [p.instruction for p in load_prompts("direction_harmful_val")[:16]]
    cand = contrastive_candidates(model, tok, train, batch_size=16)
    assert cand.shape == (model.config.num_hidden_layers, 1, model.config.hidden_size)
    rid = refusal_token_ids(tok)

    def refusal_score():
        return refusal_score_from_logprobs(last_logprobs(model, tok, chat_texts(tok, val)), rid)

    base = refusal_score()
    with steering(model, 14, cand[14, 0], 0.5):
        steered = refusal_score()
    gain = (steered.mean() - base.mean()).item()
    assert gain > 1.0, f"refusal score {base.mean():.2f} -> {steered.mean():.2f}"


def test_prepare_cache_key_changes_with_the_judge(tiny_model_dir, monkeypatch) -> None:
    """The steering search is judged: a search made under another judge version is not reused."""
    from hydra import compose, initialize_config_dir

    from safesteer import prepare
    from safesteer.config import CONF_DIR
    from safesteer.core import judge

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config")
    key = prepare.cache_key(cfg, str(tiny_model_dir))
    assert prepare.cache_key(cfg, str(tiny_model_dir)) == key
    monkeypatch.setattr(judge, "VERSION", judge.VERSION + 1)
    assert prepare.cache_key(cfg, str(tiny_model_dir)) != key


# ------------------------------------------------------------------------------ prompt-only steering
def test_prompt_only_steering_adds_at_the_masked_positions_only(tiny) -> None:
    model, tok = tiny
    enc = _enc(tok, chat_texts(tok, HARMFUL[:2]))
    v, c, layer = _vec(model, seed=4), 0.5, 2
    T = enc["input_ids"].shape[1]
    mask = torch.zeros(2, T)
    mask[0, : T - 3] = 1  # row 0: the last 3 positions play the answer
    mask[1, :] = 1
    with torch.no_grad():
        with _BlockInputs(model) as base:
            model(**enc)
        with _BlockInputs(model) as steered, steering(model, layer, v, c, "prompt", mask):
            model(**enc)
    diff = steered.inputs[layer] - base.inputs[layer]
    torch.testing.assert_close(diff, mask.unsqueeze(-1) * (c * v), rtol=0, atol=1e-5)


def test_prompt_only_steering_in_generate_steers_the_prefill_not_the_decoding(tiny) -> None:
    """With a KV cache, generate's first pass is the prompt (steered) and each later pass is one new
    token (not steered): the greedy tokens differ from all-position steering after the first."""
    model, tok = tiny
    v, layer = _vec(model, seed=1, scale=8.0), 1
    seen: list[tuple[int, float]] = []
    base_in: list[torch.Tensor] = []

    def record(store):
        def hook(module, args, kwargs):
            store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        return hook

    texts = chat_texts(tok, HARMFUL[:1])
    for mode in ("none", "prompt"):
        store: list[torch.Tensor] = []
        # recorded after the steering hook: registered later, runs later
        ctx = steering(model, layer, v, 1.0, "prompt") if mode == "prompt" else contextlib.nullcontext()
        with ctx:
            h = model.model.layers[layer].register_forward_pre_hook(record(store), with_kwargs=True)
            try:
                generate(model, tok, texts, max_new_tokens=4)
            finally:
                h.remove()
        if mode == "none":
            base_in = store
        else:
            seen = store
    assert len(seen) == len(base_in) >= 2
    prefill = seen[0] - base_in[0]
    torch.testing.assert_close(prefill, v.expand_as(prefill), rtol=0, atol=1e-4)
    # decoding steps are not steered (their inputs differ from the base only through the context)
    for s, b in zip(seen[1:], base_in[1:]):
        assert s.shape[1] == 1
        assert not torch.allclose(s - b, v.expand_as(s), atol=1e-3)


def test_prompt_positions_and_bad_mode(tiny) -> None:
    from safesteer.core.steering import prompt_mask

    m = prompt_mask(torch.tensor([2, 4]), 5)
    assert m.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    model, _ = tiny
    with pytest.raises(SafeSteerError, match="teacher.positions=middle"):
        with steering(model, 1, _vec(model), 1.0, "middle"):
            pass


def test_zero_candidates_are_not_scored(tiny) -> None:
    """Difference-in-means at block 0 and the template's own tokens is exactly zero (the same
    embeddings for every prompt); it cannot steer, so the reference selection never ranks it."""
    model, tok = tiny
    cands = diff_in_means_candidates(model, tok, HARMFUL, HARMLESS)
    assert float(cands[0].norm()) < 1e-6 * float(cands[1].norm())  # zero up to rounding
    scores = reference_scores(model, tok, cands, HARMFUL[:1], HARMLESS[:1], layers=[0, 1])
    assert {s.layer for s in scores} == {1}
    assert len(scores) == cands.shape[1]


def test_residual_norms_are_the_block_inputs_norms(tiny) -> None:
    model, tok = tiny
    texts = chat_texts(tok, HARMFUL[:2])
    norms = residual_norms(model, tok, texts, batch_size=1)
    assert norms.shape == (model.config.num_hidden_layers,)
    ids = tok(texts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    one = residual_norms(model, tok, texts[:1])
    torch.testing.assert_close(one, torch.stack([h[0, -1].norm() for h in hs[:-1]]), atol=1e-4, rtol=1e-4)
