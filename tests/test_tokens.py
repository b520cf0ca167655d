"""Tests for safesteer.core.tokens: safety-token selection on the tiny model, against a recomputation.

The reference below scores every (sample, position) on its own (no padding, no batching), masks the
positions after the unsteered argmax reaches an end-of-turn id, bans tokens, and ranks by the three
methods. Generation is replaced by fixed completions so both sides see the same samples.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from safesteer.config import compose
from safesteer.core import tokens as T
from safesteer.core.generation import chat_texts
from safesteer.core.steering import SteeringVector, Teacher
from safesteer.core.tokens import (
    SafetyTokens,
    TokenSelection,
    TokenStats,
    accumulate,
    banned_ids,
    rank_tokens,
    select_safety_tokens,
    valid_positions,
)
from safesteer.errors import SafeSteerError
from safesteer.prepare import token_selection

PROMPTS = ["What is the capital of France?", "Tell me a short story about a cat.", "How do tides work?"]
HORIZON = 4
SAMPLES = 2
STEER_LAYER = 2


@pytest.fixture(scope="module")
def teacher(tiny) -> Teacher:
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    # the residual stream of the random model has norm ~0.2: a vector of norm ~0.6 changes it a lot
    vec = torch.randn(model.config.hidden_size, generator=g) * 0.08
    return Teacher(
        kind="vector", vector=SteeringVector(vector=vec, layer=STEER_LAYER, coeff=1.0, method="test")
    )


@pytest.fixture(scope="module")
def banned_ref(tiny) -> torch.Tensor:
    """Banned ids, recomputed: special tokens, any token whose text contains '<|', rows past the tokenizer."""
    model, tok = tiny
    V = model.get_output_embeddings().weight.shape[0]
    banned = torch.zeros(V, dtype=torch.bool)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    for i in range(V):
        if i in special or i >= len(tok) or "<|" in tok.decode([i]):
            banned[i] = True
    return banned


@pytest.fixture(scope="module")
def completions(tiny) -> dict[str, list[list[int]]]:
    """Fixed 'sampled' completions per teacher prompt text: varied lengths, including empty and full."""
    _, tok = tiny

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    pool = [
        ids(" Paris is the capital")[: HORIZON - 1],
        ids(" I am")[:2],
        ids(" Once upon a time")[: HORIZON - 1],
        [],
        ids(" The moon pulls")[: HORIZON - 1],
        ids(" Sorry")[:1],
    ]
    texts = chat_texts(tok, PROMPTS)  # a vector teacher uses the plain chat prompts
    return {t: pool[SAMPLES * i : SAMPLES * (i + 1)] for i, t in enumerate(texts)}


@pytest.fixture
def fixed_generate(tiny, monkeypatch: pytest.MonkeyPatch, completions):
    model, _ = tiny
    calls = []

    def fake_generate(model_, tok_, texts, max_new_tokens, **kw):
        assert max_new_tokens == HORIZON - 1
        assert kw["num_return_sequences"] == SAMPLES and kw["do_sample"] is True
        calls.append(bool(model_.model.layers[STEER_LAYER]._forward_pre_hooks))  # steered while sampling?
        return [list(c) for t in texts for c in completions[t]]

    monkeypatch.setattr(T, "generate", fake_generate)
    return calls


def _reference_rows(model, tok, teacher, completions, eot: set[int]):
    """(steered, base) full-vocabulary log-probs at every valid (sample, position): two (n, V) float64."""
    rows_s, rows_b, n_unmasked = [], [], 0
    for text, comps in completions.items():
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        for c in comps:
            seq = torch.tensor([prompt + c])
            with torch.no_grad():
                with teacher.apply(model):
                    lp_s = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
                lp_b = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            # position h (0..len(c)) predicts completion token h; it sits at index len(prompt) - 1 + h
            idx = [len(prompt) - 1 + h for h in range(len(c) + 1)]
            n_unmasked += len(idx)
            keep = []
            for i in idx:
                keep.append(i)
                if lp_b[i].argmax().item() in eot:
                    break  # later positions are masked
            rows_s.append(lp_s[keep])
            rows_b.append(lp_b[keep])
    return torch.cat(rows_s), torch.cat(rows_b), n_unmasked


def _reference_rank(vs, vb, method, k, banned, min_steered_prob, vote_top):
    d = vs - vb
    mean_ps, mean_pb = vs.exp().mean(0), vb.exp().mean(0)
    banned = banned | (mean_ps < min_steered_prob)
    if method == "vote":
        votes = torch.zeros(d.shape[1], dtype=torch.float64)
        for row in d:
            row = row.masked_fill(banned, float("-inf"))
            for v in row.topk(vote_top).indices.tolist():
                votes[v] += 1
        mean_d = d.mean(0)
        order = sorted((v for v in range(d.shape[1]) if votes[v] > 0), key=lambda v: (-votes[v], -mean_d[v]))
        chosen = order[:k]
        score = votes
    else:
        score = d.mean(0) if method == "mean" else (vs.exp() * d).mean(0)
        score = score.masked_fill(banned, float("-inf"))
        chosen = score.topk(k).indices.tolist()
    return chosen, score, mean_ps, mean_pb


def _assert_same_topk(got: list[int], ref_order: list[int], ref_score: torch.Tensor, tol: float) -> None:
    """Same ids in the same order, allowing swaps only between ids whose reference scores tie within tol."""
    assert len(got) == len(ref_order)
    for g, r in zip(got, ref_order):
        if g != r:
            assert abs(ref_score[g].item() - ref_score[r].item()) <= tol, (got, ref_order)


# ---------------------------------------------------------------------------------- basic shape
@pytest.mark.parametrize("method", ["kl", "mean", "vote"])
def test_select_safety_tokens_returns_a_clean_sorted_set(tiny, teacher, method: str) -> None:
    model, tok = tiny
    torch.manual_seed(0)
    sel = TokenSelection(
        method=method, k=12, samples_per_prompt=2, horizon=3, vote_top=20, min_student_mass=0.0, batch_size=1
    )
    st = select_safety_tokens(model, tok, teacher, PROMPTS[:2], sel)
    assert st.method == method and 1 <= len(st.ids) <= 12
    assert len(set(st.ids)) == len(st.ids)
    special = set(tok.all_special_ids)
    for i, s in zip(st.ids, st.strings):
        assert i not in special and "<|" not in tok.decode([i]) and s == tok.decode([i])
        assert 0 <= i < len(tok)
    assert all(0.0 <= p <= 1.0 for p in st.p_base + st.p_steered)
    assert st.scores == sorted(st.scores, reverse=True)
    assert st.student_mass == pytest.approx(sum(st.p_base), rel=1e-6)
    assert st.steered_mass == pytest.approx(sum(st.p_steered), rel=1e-6)
    assert st.meta["n_prompts"] == 2 and st.meta["n_valid_positions"] >= 4
    assert not model.model.layers[STEER_LAYER]._forward_pre_hooks


def test_safety_tokens_save_load_round_trip(tmp_path: Path) -> None:
    st = SafetyTokens(
        ids=[57, 339, 1000],
        strings=["I", " I", "x"],
        scores=[0.3, 0.2, 0.1],
        p_base=[0.1, 0.05, 0.0],
        p_steered=[0.4, 0.2, 0.01],
        method="kl",
        student_mass=0.15,
        steered_mass=0.61,
        meta={"k": 3},
    )
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(asdict(st)))
    assert SafetyTokens.load(path, vocab_size=49152) == st
    assert "I" in st.table()


def test_safety_tokens_load_rejects_bad_files(tmp_path: Path) -> None:
    good = dict(
        ids=[5, 7],
        strings=["a", "b"],
        scores=[1.0, 0.5],
        p_base=[0.1, 0.1],
        p_steered=[0.2, 0.2],
        method="kl",
        student_mass=0.2,
        steered_mass=0.4,
    )
    cases = {
        "garbage.json": "{not json",
        "list.json": "[1, 2, 3]",
        "missing.json": json.dumps({"ids": [1]}),
        "extra.json": json.dumps({**good, "surprise": 1}),
        "empty.json": json.dumps({**good, "ids": []}),
        "negative.json": json.dumps({**good, "ids": [5, -1]}),
        "float.json": json.dumps({**good, "ids": [5, 7.5]}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SafeSteerError):
            SafetyTokens.load(tmp_path / name)
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SafeSteerError):
        SafetyTokens.load(tmp_path / "latin1.json")
    (tmp_path / "ok.json").write_text(json.dumps({**good, "ids": [5, 70000]}))
    assert SafetyTokens.load(tmp_path / "ok.json").ids == [5, 70000]
    with pytest.raises(SafeSteerError, match="outside the vocabulary"):
        SafetyTokens.load(tmp_path / "ok.json", vocab_size=49152)
    with pytest.raises(SafeSteerError, match="not found"):
        SafetyTokens.load(tmp_path / "nope.json")


def test_invalid_selections_are_refused() -> None:
    with pytest.raises(SafeSteerError, match="tokens.method=votes: choose one of"):
        TokenSelection(method="votes")
    for kw in ({"horizon": 0}, {"k": 0}, {"samples_per_prompt": 0}):
        with pytest.raises(SafeSteerError, match=">= 1"):
            TokenSelection(**kw)


def test_the_selection_is_built_from_the_tokens_config() -> None:
    sel = token_selection(compose(["tokens=vote"]).tokens)
    assert sel == TokenSelection(
        method="vote", k=50, samples_per_prompt=8, horizon=7, temperature=1.0, top_p=1.0, vote_top=200,
        min_steered_prob=1e-6, min_student_mass=0.0, batch_size=4, contrast_weight=1.0,
    )  # fmt: skip


def test_valid_positions_stop_at_the_completion_end_of_turn_and_reasoning() -> None:
    eot, H = torch.tensor([9]), 4
    argmax = torch.tensor([[1, 9, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    comps = [[5, 6, 7], [5], [7, 5, 8], [7, 5, 6]]  # 7 opens a reasoning block, 8 closes it
    got = valid_positions(argmax, comps, H, eot, (7, 8))
    assert got.tolist() == [
        [True, True, False, False],  # the base argmax reaches end-of-turn at position 1
        [True, True, False, False],  # position h exists for h <= len(completion)
        [False, False, False, True],  # <think> 5 </think>: the answer starts at position 3
        [False, False, False, False],  # a block that never closes within the horizon
    ]
    assert valid_positions(argmax, comps, H, eot, None)[2].tolist() == [True] * 4


# ------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize(
    ("method", "k", "vote_top", "min_steered_prob"),
    [
        ("kl", 10, 200, 2.2e-5),
        ("mean", 10, 200, 1e-6),
        ("mean", 10, 200, None),
        ("vote", 8, 4, 1e-6),
        ("vote", 40, 2, 1e-6),
    ],
)
def test_ranking_matches_an_independent_recomputation(
    tiny, teacher, completions, fixed_generate, banned_ref, monkeypatch, method, k, vote_top, min_steered_prob
) -> None:
    model, tok = tiny
    # Choose an end-of-turn id that the base argmax really hits at position 1 of the first sample, so
    # the masking of later positions is exercised (a random model never predicts the real EOS).
    first_text = next(iter(completions))
    seq = torch.tensor([tok(first_text, add_special_tokens=False)["input_ids"] + completions[first_text][0]])
    with torch.no_grad():
        base_argmax = model(input_ids=seq).logits[0].argmax(-1)
    n_comp = len(completions[first_text][0])
    eot_id = int(base_argmax[-n_comp])  # position h=1 predicts completion token 1
    monkeypatch.setattr(T, "stop_token_ids", lambda model_, tok_: {eot_id})

    vs, vb, n_unmasked = _reference_rows(model, tok, teacher, completions, {eot_id})
    assert vs.shape[0] < n_unmasked  # the end-of-turn masking removed positions
    if min_steered_prob is None:
        # a threshold at the median steered probability of the unfiltered choice: the ban must bite
        free, _, mean_ps, _ = _reference_rank(vs, vb, method, k, banned_ref, 0.0, vote_top)
        p_sorted = mean_ps[free].sort().values
        min_steered_prob = ((p_sorted[len(free) // 2 - 1] + p_sorted[len(free) // 2]) / 2).item()
        assert _reference_rank(vs, vb, method, k, banned_ref, min_steered_prob, vote_top)[0] != free
    ref_ids, ref_score, mean_ps, mean_pb = _reference_rank(
        vs, vb, method, k, banned_ref, min_steered_prob, vote_top
    )

    sel = TokenSelection(
        method=method,
        k=k,
        samples_per_prompt=SAMPLES,
        horizon=HORIZON,
        vote_top=vote_top,
        min_steered_prob=min_steered_prob,
        min_student_mass=0.0,
        batch_size=2,
    )
    st = select_safety_tokens(model, tok, teacher, PROMPTS, sel)
    assert fixed_generate == [True, True]  # sampled from the steered model, in 2 prompt batches
    assert st.meta["n_valid_positions"] == vs.shape[0]
    if method == "vote":
        assert st.ids == ref_ids
        assert st.scores == [ref_score[v].item() for v in ref_ids]
        assert all(s > 0 for s in st.scores)
        if k > len(ref_ids):
            assert len(st.ids) < k  # zero-vote tokens are dropped rather than padding the set
    else:
        scale = ref_score[ref_ids[0]].abs().item()
        _assert_same_topk(st.ids, ref_ids, ref_score, tol=1e-4 * scale)
        torch.testing.assert_close(
            torch.tensor(st.scores, dtype=torch.float64), ref_score[st.ids], rtol=1e-3, atol=1e-4 * scale
        )
    assert not banned_ref[st.ids].any()
    assert all(mean_ps[v] >= min_steered_prob for v in st.ids)
    torch.testing.assert_close(
        torch.tensor(st.p_steered, dtype=torch.float64), mean_ps[st.ids], rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(st.p_base, dtype=torch.float64), mean_pb[st.ids], rtol=1e-4, atol=0
    )
    assert st.student_mass == pytest.approx(mean_pb[st.ids].sum().item(), rel=1e-4)
    assert st.steered_mass == pytest.approx(mean_ps[st.ids].sum().item(), rel=1e-4)


def test_methods_rank_differently(tiny, teacher, completions, fixed_generate, banned_ref) -> None:
    """kl weighs Δ by the steered probability; mean does not: on the reference rows they disagree."""
    model, tok = tiny
    vs, vb, _ = _reference_rows(model, tok, teacher, completions, {tok.eos_token_id})
    kl_ids, *_ = _reference_rank(vs, vb, "kl", 10, banned_ref, 1e-6, 200)
    mean_ids, *_ = _reference_rank(vs, vb, "mean", 10, banned_ref, 1e-6, 200)
    assert kl_ids != mean_ids
    sel = TokenSelection(method="kl", k=10, samples_per_prompt=SAMPLES, horizon=HORIZON, min_student_mass=0.0)
    st = select_safety_tokens(model, tok, teacher, PROMPTS, sel)
    assert st.ids != mean_ids


def test_min_student_mass_guard(tiny, teacher, fixed_generate) -> None:
    model, tok = tiny
    with pytest.raises(SafeSteerError, match=r"student's probability mass") as e:
        sel = TokenSelection(
            method="kl", k=5, samples_per_prompt=SAMPLES, horizon=HORIZON, min_student_mass=1.0
        )
        select_safety_tokens(model, tok, teacher, PROMPTS, sel)
    assert "min_student_mass=1" in str(e.value)


def test_a_set_with_no_kept_token_is_an_error(tiny, teacher, monkeypatch) -> None:
    model, tok = tiny
    monkeypatch.setattr(T, "generate", lambda m, t, texts, n, **kw: [[] for _ in texts for _ in range(2)])
    with pytest.raises(SafeSteerError, match="kept no token"):
        sel = TokenSelection(
            method="kl", k=5, samples_per_prompt=2, horizon=2, min_steered_prob=0.5, min_student_mass=0.0
        )
        select_safety_tokens(model, tok, teacher, PROMPTS[:1], sel)


# ------------------------------------------------------------------- ranking, on hand-made statistics
# Six ids: 5 is banned (special), 4 has a mean steered probability below MIN_P, 0..3 compete.
MIN_P = 1e-6
DELTA_ROWS = torch.tensor(
    [[0.0, 3.0, 2.0, 1.0, -1.0, 5.0], [0.0, 0.2, 2.5, 0.5, -2.0, 4.0]], dtype=torch.float64
)  # mean Δ: [0, 1.6, 2.25, 0.75, -1.5, 4.5]
MEAN_PS = torch.tensor([0.3, 0.05, 0.2, 0.4, 1e-8, 0.05], dtype=torch.float64)
MEAN_PB = torch.tensor([0.5, 0.01, 0.05, 0.3, 0.1, 0.04], dtype=torch.float64)
MEAN_KL = torch.tensor([0.0, 0.1, 0.45, 0.3, 0.9, 0.2], dtype=torch.float64)
BANNED = torch.tensor([False, False, False, False, False, True])


def _stats(rows: torch.Tensor, mean_ps, mean_pb, mean_kl) -> TokenStats:
    """What :func:`accumulate` returns for these valid rows of Δ and these per-token means."""
    n = rows.shape[0]
    return TokenStats(rows.sum(0), mean_ps * n, mean_pb * n, mean_kl * n, n, [rows])


@pytest.mark.parametrize(
    ("method", "k", "want_ids", "want_scores"),
    [
        ("mean", 3, [2, 1, 3], [2.25, 1.6, 0.75]),  # by mean Δ; 4 and 5 banned though 5's Δ is the largest
        ("kl", 3, [2, 3, 1], [0.45, 0.3, 0.1]),  # by mean p_steered·Δ; 4's 0.9 is banned by MIN_P
        ("kl", 10, [2, 3, 1, 0], [0.45, 0.3, 0.1, 0.0]),  # never more than the unbanned ids
    ],
)
def test_rank_mean_and_kl_on_hand_made_statistics(method, k, want_ids, want_scores) -> None:
    acc = _stats(DELTA_ROWS, MEAN_PS, MEAN_PB, MEAN_KL)
    ids, score = rank_tokens(acc, BANNED, TokenSelection(method=method, k=k, min_steered_prob=MIN_P))
    assert ids == want_ids
    assert [score[v].item() for v in ids] == pytest.approx(want_scores)
    assert score[4] == float("-inf") and score[5] == float("-inf")
    assert not BANNED[4]  # the caller's mask is not modified


@pytest.mark.parametrize(
    ("vote_top", "k", "want_ids", "want_votes"),
    [
        # top-2 per row: row 0 votes 1, 2; row 1 votes 2, 3. 1 and 3 tie on votes: 1 has the larger mean Δ
        (2, 3, [2, 1, 3], [2.0, 1.0, 1.0]),
        (2, 2, [2, 1], [2.0, 1.0]),
        # top-1: row 0 votes 1, row 1 votes 2; a tie broken by mean Δ; zero-vote ids are dropped, not padded
        (1, 4, [2, 1], [1.0, 1.0]),
    ],
)
def test_rank_vote_on_hand_made_statistics(vote_top, k, want_ids, want_votes) -> None:
    acc = _stats(DELTA_ROWS, MEAN_PS, MEAN_PB, MEAN_KL)
    sel = TokenSelection(method="vote", k=k, vote_top=vote_top, min_steered_prob=MIN_P)
    ids, score = rank_tokens(acc, BANNED, sel)
    assert ids == want_ids
    assert [score[v].item() for v in ids] == want_votes
    assert score[4] == 0.0 and score[5] == 0.0  # banned ids (row 0's top Δ is 5) get no votes


@pytest.mark.parametrize(
    ("weight", "want_ids", "want_scores"),
    [
        (0.0, [3, 1, 0], [0.6, 0.3, 0.1]),  # harmful p_steered·Δ alone
        (2.0, [1, 3, 0], [0.28, 0.0, -0.9]),  # minus 2 x benign p_base: 3 is common on benign prompts
    ],
)
def test_rank_contrast_on_hand_made_statistics(weight, want_ids, want_scores) -> None:
    acc = _stats(DELTA_ROWS, MEAN_PS, MEAN_PB, MEAN_KL)
    # on the harmful prompts: 2 is too rare under the steered model, 4 is too rare on the benign ones
    harmful_ps = torch.tensor([0.2, 0.3, 1e-9, 0.3, 0.3, 0.3], dtype=torch.float64)
    harmful_kl = torch.tensor([0.1, 0.3, 0.2, 0.6, 0.9, 1.0], dtype=torch.float64)
    harmful = _stats(DELTA_ROWS[:1], harmful_ps, MEAN_PB, harmful_kl)
    sel = TokenSelection(method="contrast", k=5, min_steered_prob=MIN_P, contrast_weight=weight)
    ids, score = rank_tokens(acc, BANNED, sel, harmful)
    assert ids == want_ids
    assert [score[v].item() for v in ids] == pytest.approx(want_scores)


@pytest.mark.parametrize("method", ["vote", "mean", "kl"])
def test_rank_with_everything_banned_is_an_error(method) -> None:
    acc = _stats(DELTA_ROWS, MEAN_PS, MEAN_PB, MEAN_KL)
    with pytest.raises(SafeSteerError, match=f"\\({method}\\) kept no token"):
        rank_tokens(
            acc, torch.ones(6, dtype=torch.bool), TokenSelection(method=method, k=3, min_steered_prob=MIN_P)
        )


# ------------------------------------------------------------------------------------- contrast
def test_contrast_ranks_by_harmful_kl_minus_benign_use(tiny, teacher) -> None:
    """contrast = mean p_steered·Δ on the harmful prompts - w · mean p_base on the harmless ones,
    recomputed here from the same sampling (the seed fixes the samples)."""
    model, tok = tiny
    harmless, harmful = PROMPTS[:2], PROMPTS[2:4]
    sel = TokenSelection(
        method="contrast", k=10, samples_per_prompt=2, horizon=3, min_student_mass=0.0, batch_size=1,
        contrast_weight=2.0,
    )  # fmt: skip
    torch.manual_seed(0)
    st = select_safety_tokens(model, tok, teacher, harmless, sel, harmful)
    torch.manual_seed(0)
    b = accumulate(model, tok, teacher, harmless, sel)
    h = accumulate(model, tok, teacher, harmful, sel)
    V = b.ps.shape[0]
    score = h.kl / h.n - 2.0 * b.pb / b.n
    banned = banned_ids(tok, V) | (b.ps / b.n < 1e-6) | (h.ps / h.n < 1e-6)
    want = score.masked_fill(banned, float("-inf")).topk(10).indices.tolist()
    _assert_same_topk(st.ids, want, score, 1e-9)
    assert st.method == "contrast" and st.meta["contrast_weight"] == 2.0
    with pytest.raises(SafeSteerError, match="needs harmful prompts"):
        select_safety_tokens(model, tok, teacher, harmless, sel)


def test_the_content_hash_names_the_ids_their_strings_and_their_order():
    def st(ids, strings):
        return SafetyTokens(
            ids, strings, [0.0] * len(ids), [0.0] * len(ids), [0.0] * len(ids), "kl", 0.1, 0.2
        )

    a = st([5, 7, 9], ["I", " sorry", " cannot"])
    assert a.content_hash() == st([5, 7, 9], ["I", " sorry", " cannot"]).content_hash()
    assert a.content_hash() != st([7, 5, 9], [" sorry", "I", " cannot"]).content_hash()  # K order
    assert a.content_hash() != st([5, 7, 9], ["I", " sorry", " can"]).content_hash()
    assert a.content_hash() != st([5, 7, 8], ["I", " sorry", " cannot"]).content_hash()
