"""Tests for safesteer.core.loss: the localized reverse KL and its variants, against independent references.

The references below never call the code under test: they loop over the safety ids and take
``torch.log_softmax`` over the full vocabulary in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safesteer.core.loss import (
    MODES,
    gather_logprobs,
    head_logprobs,
    localized_reverse_kl,
    localized_reverse_kl_terms,
    per_sequence_mean,
    safety_mass,
    sequence_mean,
)

PROPS = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------------------- helpers
def _case(
    seed: int, B: int = 2, T: int = 3, V: int = 11, K: int = 4, scale: float = 3.0, dtype=torch.float64
):
    """Random student logits (requires grad), teacher full log-probs (B,T,V) and K distinct ids."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    t_full = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale, -1)
    ids = torch.randperm(V, generator=g)[:K]
    return s, t_full, ids


def ref_partial(s_logits: torch.Tensor, t_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """sum_{v in S} p_s(v) (log p_s(v) - log p_t(v)), one safety id at a time (float64)."""
    s_lp = torch.log_softmax(s_logits.double(), dim=-1)
    out = torch.zeros(s_lp.shape[:2], dtype=torch.float64)
    for v in ids.tolist():
        out = out + s_lp[..., v].exp() * (s_lp[..., v] - t_full[..., v].double())
    return out


def ref_renormalized(s_logits: torch.Tensor, t_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL(q_s || q_t) with q = p restricted to S and renormalised (float64)."""
    p_s = torch.softmax(s_logits.double(), dim=-1)
    p_t = t_full.double().exp()
    ids_l = ids.tolist()
    z_s = sum(p_s[..., v] for v in ids_l)
    z_t = sum(p_t[..., v] for v in ids_l)
    out = torch.zeros(p_s.shape[:2], dtype=torch.float64)
    for v in ids_l:
        qs, qt = p_s[..., v] / z_s, p_t[..., v] / z_t
        out = out + qs * (qs.log() - qt.log())
    return out


def ref_bucket(s_logits: torch.Tensor, t_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The exact KL between the (K+1)-bucket coarse-grainings [p(v) for v in S] + [1 - sum_S p]."""
    p_s = torch.softmax(s_logits.double(), dim=-1)
    p_t = t_full.double().exp()
    buckets_s = [p_s[..., v] for v in ids.tolist()]
    buckets_t = [p_t[..., v] for v in ids.tolist()]
    rest_mask = torch.ones(p_s.shape[-1], dtype=torch.bool)
    rest_mask[ids] = False
    buckets_s.append(p_s[..., rest_mask].sum(-1))
    buckets_t.append(p_t[..., rest_mask].sum(-1))
    out = torch.zeros(p_s.shape[:2], dtype=torch.float64)
    for bs, bt in zip(buckets_s, buckets_t):
        out = out + bs * (bs.log() - bt.log())
    return out


def _grad(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Gradient of a weighted sum of ``out`` (random weights, so each position's gradient is checked)."""
    (g,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), x, retain_graph=True)
    return g


# --------------------------------------------------------------------------------------- partial
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_matches_reference_values_and_gradients(seed: int) -> None:
    s, t_full, ids = _case(seed, B=3, T=4, V=13, K=5)
    w = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    got = localized_reverse_kl_terms(s, t_full[..., ids], ids, mode="partial")
    ref = ref_partial(s, t_full, ids)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grad(got, s, w), _grad(ref, s, w), rtol=1e-4, atol=1e-6)


def test_partial_can_be_negative_and_has_the_p_t_over_e_stationary_point() -> None:
    # The unnormalised partial KL is not a divergence: it goes negative and its minimum on S is at p_t/e.
    V, ids = 6, torch.tensor([0, 1])
    t_full = torch.log(torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)).view(1, 1, V)
    target = torch.tensor([0.3 / math.e, 0.2 / math.e], dtype=torch.float64)
    rest = (1 - target.sum()) / 4
    s = torch.log(torch.cat([target, rest.repeat(4)])).view(1, 1, V).requires_grad_(True)
    val = localized_reverse_kl_terms(s, t_full[..., ids], ids, mode="partial")
    assert val.item() < 0
    torch.testing.assert_close(val.double(), ref_partial(s, t_full, ids), rtol=1e-5, atol=1e-7)
    # every logit's gradient vanishes there (log(p_s/p_t) + 1 = 0 on S)
    (g,) = torch.autograd.grad(val.sum(), s)
    assert g.abs().max() < 1e-5
    # ... and not at p_s = p_t
    s_eq = t_full.clone().requires_grad_(True)
    (g_eq,) = torch.autograd.grad(localized_reverse_kl_terms(s_eq, t_full[..., ids], ids).sum(), s_eq)
    assert g_eq.abs().max() > 1e-2


def test_partial_with_bf16_student_logits_is_computed_in_fp32() -> None:
    g = torch.Generator().manual_seed(7)
    V, ids = 50, torch.tensor([3, 17, 21, 40, 49])
    s32 = torch.randn(2, 5, V, generator=g) * 6
    s_bf16 = s32.to(torch.bfloat16).requires_grad_(True)
    t_full = torch.log_softmax(torch.randn(2, 5, V, generator=g) * 6, -1)
    got = localized_reverse_kl_terms(s_bf16, t_full[..., ids], ids, mode="partial")
    assert got.dtype == torch.float32
    # fp32 reference on the bf16-rounded logits: tight, since only fp32 rounding separates them
    ref = ref_partial(s_bf16.detach().float(), t_full, ids).float()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # a bf16 softmax would be far off: make sure we are much closer than bf16 precision allows
    lp_bf16 = torch.log_softmax(s_bf16.detach(), -1)[..., ids].float()
    bf16_terms = (lp_bf16.exp() * (lp_bf16 - t_full[..., ids])).sum(-1)
    assert (bf16_terms - ref).abs().max() > 10 * (got - ref).abs().max()
    (gs,) = torch.autograd.grad(got.sum(), s_bf16)
    assert gs.dtype == torch.bfloat16 and torch.isfinite(gs.float()).all()


@PROPS
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 40), scale=st.floats(0.1, 8.0))
def test_partial_is_zero_when_student_equals_teacher(seed: int, V: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale
    K = int(torch.randint(1, V + 1, (1,), generator=g))
    ids = torch.randperm(V, generator=g)[:K]
    t_lp = torch.log_softmax(logits, -1)[..., ids]
    terms = localized_reverse_kl_terms(logits, t_lp, ids, mode="partial")
    torch.testing.assert_close(terms, torch.zeros_like(terms), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ renormalize
@pytest.mark.parametrize("seed", [0, 1])
def test_renormalized_partial_matches_reference(seed: int) -> None:
    s, t_full, ids = _case(seed, V=17, K=6)
    w = torch.rand(2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = localized_reverse_kl_terms(s, t_full[..., ids], ids, mode="partial", renormalize=True)
    ref = ref_renormalized(s, t_full, ids)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grad(got, s, w), _grad(ref, s, w), rtol=1e-4, atol=1e-6)
    # and it is not the unnormalised value
    assert not torch.allclose(got.double(), ref_partial(s, t_full, ids), atol=1e-3)


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    V=st.integers(2, 40),
    scale=st.floats(0.1, 10.0),
    mode=st.sampled_from(["partial", "topk"]),
)
def test_renormalized_is_a_nonnegative_kl(seed: int, V: int, scale: float, mode: str) -> None:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale
    t_full = torch.log_softmax(torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale, -1)
    K = int(torch.randint(1, V + 1, (1,), generator=g))
    if mode == "topk":
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(6)]).view(2, 3, K)
        t_lp = torch.gather(t_full, -1, ids)
    else:
        ids = torch.randperm(V, generator=g)[:K]
        t_lp = t_full[..., ids]
    terms = localized_reverse_kl_terms(s, t_lp, ids, mode=mode, renormalize=True)
    assert torch.isfinite(terms).all()
    assert (terms >= -1e-5).all()
    if mode == "partial":
        torch.testing.assert_close(terms.double(), ref_renormalized(s, t_full, ids), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- full
@PROPS
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 60), scale=st.floats(0.1, 10.0))
def test_full_is_reverse_kl_over_the_vocabulary(seed: int, V: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale
    t_lp = torch.log_softmax(torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale, -1)
    got = localized_reverse_kl_terms(s, t_lp, None, mode="full")
    s_lp = torch.log_softmax(s, -1)
    ref = torch.nn.functional.kl_div(t_lp, s_lp, log_target=True, reduction="none").sum(-1)  # KL(s || t)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    assert (got >= -1e-5).all()


def test_full_is_reverse_not_forward_kl() -> None:
    s, t_full, _ = _case(3, V=9)
    got = localized_reverse_kl_terms(s, t_full, None, mode="full").double()
    s_lp = torch.log_softmax(s.detach(), -1)
    forward = (t_full.exp() * (t_full - s_lp)).sum(-1)
    assert (got - forward).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ bucket
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_matches_explicit_k_plus_one_bucket_kl(seed: int) -> None:
    s, t_full, ids = _case(seed, B=2, T=4, V=15, K=5)
    w = torch.rand(2, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = localized_reverse_kl_terms(s, t_full[..., ids], ids, mode="bucket")
    ref = ref_bucket(s, t_full, ids)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_grad(got, s, w), _grad(ref, s, w), rtol=1e-3, atol=1e-5)


@PROPS
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(3, 40), scale=st.floats(0.1, 10.0))
def test_bucket_is_nonnegative_and_zero_at_equality(seed: int, V: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale
    t_full = torch.log_softmax(torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale, -1)
    K = int(torch.randint(1, V, (1,), generator=g))  # a non-empty complement
    ids = torch.randperm(V, generator=g)[:K]
    terms = localized_reverse_kl_terms(s, t_full[..., ids], ids, mode="bucket")
    assert torch.isfinite(terms).all() and (terms >= -1e-5).all()
    same = localized_reverse_kl_terms(s, torch.log_softmax(s, -1)[..., ids], ids, mode="bucket")
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-5)


def test_bucket_is_minimised_at_the_teacher_not_at_p_t_over_e() -> None:
    V, ids = 6, torch.tensor([0, 1])
    t_full = torch.log(torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)).view(1, 1, V)
    s = t_full.clone().requires_grad_(True)
    val = localized_reverse_kl_terms(s, t_full[..., ids], ids, mode="bucket")
    (g,) = torch.autograd.grad(val.sum(), s)
    assert abs(val.item()) < 1e-6 and g.abs().max() < 1e-4
    (g_partial,) = torch.autograd.grad(localized_reverse_kl_terms(s, t_full[..., ids], ids).sum(), s)
    assert g_partial.abs().max() > 1e-2  # the partial term still pushes at p_s = p_t


def test_bucket_with_renormalize_is_refused() -> None:
    s, t_full, ids = _case(0)
    with pytest.raises(ValueError, match="exclusive"):
        localized_reverse_kl_terms(s, t_full[..., ids], ids, mode="bucket", renormalize=True)


# -------------------------------------------------------------------------------------------- topk
def test_topk_with_per_position_ids_matches_reference() -> None:
    B, T, V, K = 2, 3, 12, 4
    s, t_full, _ = _case(5, B=B, T=T, V=V)
    ids = t_full.topk(K, dim=-1).indices  # the teacher's own top-K at each position, (B,T,K)
    t_lp = torch.gather(t_full, -1, ids)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = localized_reverse_kl_terms(s, t_lp, ids, mode="topk")
    s_lp = torch.log_softmax(s.double(), -1)
    ref = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for v in ids[b, t].tolist():
                ref[b, t] = ref[b, t] + s_lp[b, t, v].exp() * (s_lp[b, t, v] - t_full[b, t, v])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # gradient reference built without in-place writes into the graph
    terms = []
    for b in range(B):
        for t in range(T):
            idx = ids[b, t]
            terms.append((s_lp[b, t, idx].exp() * (s_lp[b, t, idx] - t_full[b, t, idx])).sum())
    ref_g = torch.stack(terms).view(B, T)
    torch.testing.assert_close(_grad(got, s, w), _grad(ref_g, s, w), rtol=1e-4, atol=1e-6)
    # different positions really use different ids: a global-id call with ids[0,0] differs
    other = localized_reverse_kl_terms(s, t_full[..., ids[0, 0]], ids[0, 0], mode="partial")
    assert not torch.allclose(other, got, atol=1e-4)


# -------------------------------------------------------------------------------------- k1 and k3
def test_k1_value_and_score_function_gradient() -> None:
    B, T, V = 2, 4, 10
    s, t_full, _ = _case(11, B=B, T=T, V=V)
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    t_x = torch.gather(t_full, -1, x.unsqueeze(-1)).squeeze(-1)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = localized_reverse_kl_terms(s, t_x, None, mode="k1", target_ids=x)
    s_x = torch.gather(torch.log_softmax(s.double(), -1), -1, x.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), (s_x - t_x).detach(), rtol=1e-5, atol=1e-6)
    # gradient = (logp_s(x) - logp_t(x)) * grad logp_s(x)
    (g_logp,) = torch.autograd.grad((s_x * w * (s_x - t_x).detach()).sum(), s, retain_graph=True)
    torch.testing.assert_close(_grad(got, s, w), g_logp, rtol=1e-4, atol=1e-6)
    # not the gradient of the value itself (that would be grad logp_s(x))
    (g_naive,) = torch.autograd.grad((s_x * w).sum(), s)
    assert not torch.allclose(_grad(got, s, w), g_naive, atol=1e-3)


@PROPS
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 40), scale=st.floats(0.1, 10.0))
def test_k3_is_nonnegative_matches_formula_and_vanishes_at_equality(seed: int, V: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale
    t_full = torch.log_softmax(torch.randn(2, 3, V, generator=g, dtype=torch.float64) * scale, -1)
    x = torch.randint(0, V, (2, 3), generator=g)
    t_x = torch.gather(t_full, -1, x.unsqueeze(-1)).squeeze(-1)
    got = localized_reverse_kl_terms(s, t_x, None, mode="k3", target_ids=x)
    s_x = torch.gather(torch.log_softmax(s, -1), -1, x.unsqueeze(-1)).squeeze(-1)
    log_r = (t_x - s_x).clamp(-30.0, 30.0)  # documented clamp that keeps exp finite
    ref = log_r.exp() - 1 - log_r
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    assert (got >= 0).all()
    same = localized_reverse_kl_terms(s, s_x, None, mode="k3", target_ids=x)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-6)


def test_sampled_modes_need_target_ids_and_set_modes_need_ids() -> None:
    s, t_full, ids = _case(0)
    for mode in ("k1", "k3"):
        with pytest.raises(ValueError, match="target_ids"):
            localized_reverse_kl_terms(s, t_full[..., 0], None, mode=mode)
    for mode in ("partial", "bucket", "topk"):
        with pytest.raises(ValueError, match="ids"):
            localized_reverse_kl_terms(s, t_full[..., ids], None, mode=mode)


@pytest.mark.parametrize("mode", ["", "reverse", "PARTIAL", "kl"])
def test_invalid_mode_raises_value_error(mode: str) -> None:
    s, t_full, ids = _case(0)
    with pytest.raises(ValueError, match="unknown loss mode"):
        localized_reverse_kl_terms(s, t_full[..., ids], ids, mode=mode)
    with pytest.raises(ValueError):
        localized_reverse_kl(s, t_full[..., ids], ids, torch.ones(2, 3), mode=mode)


# ----------------------------------------------------------------------------- masking and means
def test_sequence_mean_is_per_sequence_then_over_sequences() -> None:
    terms = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    per_seq = sequence_mean(terms, mask)
    torch.testing.assert_close(per_seq, torch.tensor([2.5, 20.0, 0.0]))
    # localized_reverse_kl reduces exactly like that: (2.5 + 20 + 0) / 3, not the token mean 30/5
    assert per_seq.mean().item() == pytest.approx(22.5 / 3)
    assert (terms * mask).sum().item() / mask.sum().item() == pytest.approx(6.0)


def test_localized_reverse_kl_reduces_by_sequence_then_batch() -> None:
    s, t_full, ids = _case(9, B=2, T=5, V=12, K=3)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.float32)
    ref_terms = ref_partial(s, t_full, ids)
    expected = (ref_terms[0, 1:].mean() + ref_terms[1, 3]) / 2
    token_mean = (ref_terms * mask.double()).sum() / mask.sum()
    assert abs(expected - token_mean) > 1e-3  # the example distinguishes the two reductions
    got = localized_reverse_kl(s, t_full[..., ids], ids, mask, mode="partial")
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["partial", "bucket", "full", "topk", "k1", "k3"]),
    renormalize=st.booleans(),
)
def test_masked_positions_do_not_affect_loss_or_gradient(seed: int, mode: str, renormalize: bool) -> None:
    renormalize = renormalize and mode in ("partial", "topk")
    g = torch.Generator().manual_seed(seed)
    B, T, V, K = 3, 5, 13, 4
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    t_full = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3, -1)
    mask = (torch.rand(B, T, generator=g) < 0.5).float()
    mask[0, 0] = 1.0
    x = torch.randint(0, V, (B, T), generator=g)
    if mode == "topk":
        ids = t_full.topk(K, -1).indices
        t_lp = torch.gather(t_full, -1, ids)
    elif mode == "full":
        ids, t_lp = None, t_full
    elif mode in ("k1", "k3"):
        ids, t_lp = None, torch.gather(t_full, -1, x.unsqueeze(-1)).squeeze(-1)
    else:
        ids = torch.randperm(V, generator=g)[:K]
        t_lp = t_full[..., ids]
    # k3 is exp(log p_t - log p_s): keep it inside float32 range (a masked term of inf would give
    # inf * 0 = nan in the masked mean), the other modes are finite for any finite logits
    noise = torch.randn(B, T, V, generator=g, dtype=torch.float64) * (5 if mode == "k3" else 20)
    s2 = torch.where(mask.bool().unsqueeze(-1), s, s + noise)

    def loss_and_grad(logits):
        logits = logits.clone().requires_grad_(True)
        loss = localized_reverse_kl(logits, t_lp, ids, mask, mode=mode, renormalize=renormalize, target_ids=x)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    l1, g1 = loss_and_grad(s)
    l2, g2 = loss_and_grad(s2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-8)
    assert (g1[~mask.bool()] == 0).all()


# ------------------------------------------------------------------------------------- safety mass
def test_safety_mass_is_the_mean_set_mass_over_completion_positions() -> None:
    s, _, ids = _case(4, B=2, T=4, V=10, K=3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    p = torch.softmax(s.detach().double(), -1)
    per_pos = sum(p[..., v] for v in ids.tolist())
    expected = (per_pos[0, 0] + per_pos[0, 1] + per_pos[1, 3]) / 3
    got = safety_mass(s, ids, mask)
    assert not got.requires_grad
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # all ids -> mass 1 everywhere
    assert safety_mass(s, torch.arange(10), mask).item() == pytest.approx(1.0, abs=1e-5)


def test_gather_logprobs_global_and_per_position_ids() -> None:
    s, _, ids = _case(2, V=9, K=3)
    full = torch.log_softmax(s.detach().double(), -1)
    torch.testing.assert_close(gather_logprobs(s, ids).double(), full[..., ids], rtol=1e-5, atol=1e-6)
    per_pos = torch.randint(0, 9, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        gather_logprobs(s, per_pos).double(), torch.gather(full, -1, per_pos), rtol=1e-5, atol=1e-6
    )


def test_modes_tuple_is_complete() -> None:
    assert set(MODES) == {"partial", "bucket", "full", "topk", "k1", "k3"}


def test_freeze_below_freezes_embeddings_and_early_blocks_only(tiny) -> None:
    import copy

    from safesteer.errors import SafeSteerError
    from safesteer.learner import freeze_below

    model = copy.deepcopy(tiny[0])
    names = freeze_below(model, 3)
    assert "model.embed_tokens.weight" in names
    assert any(n.startswith("model.layers.2.") for n in names)
    assert not any(n.startswith(("model.layers.3.", "model.layers.5.", "model.norm")) for n in names)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n not in names)
    assert freeze_below(copy.deepcopy(tiny[0]), None) == []
    with pytest.raises(SafeSteerError, match="train_from_layer=9"):
        freeze_below(copy.deepcopy(tiny[0]), 9)


# ------------------------------------------------------------------------------ the chunked head
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("per_row", [False, True])
def test_head_logprobs_equals_the_full_log_softmax_and_its_gradient(chunk: int, per_row: bool) -> None:
    g = torch.Generator().manual_seed(5)
    N, D, V, K = 7, 5, 13, 4
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    head = torch.nn.Linear(D, V, bias=True)
    ids = torch.randint(0, V, (N, K), generator=g) if per_row else torch.randperm(V, generator=g)[:K]
    weights = torch.randn(N, K, generator=g)
    got = head_logprobs(hidden, head, ids, chunk)
    full = torch.log_softmax(head(hidden), -1)  # reference: the whole (N,V) at once
    want = torch.gather(full, -1, ids) if per_row else full[:, ids]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    g_got = torch.autograd.grad((got * weights).sum(), [hidden, head.weight])
    g_want = torch.autograd.grad((want * weights).sum(), [hidden, head.weight])
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_head_logprobs_runs_the_head_chunk_rows_at_a_time() -> None:
    seen = []
    head = torch.nn.Linear(3, 9)
    head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    head_logprobs(torch.randn(10, 3, requires_grad=True), head, torch.tensor([1, 2]), 4).sum().backward()
    assert seen[:3] == [4, 4, 2]  # the forward, chunk by chunk
    assert sorted(seen[3:]) == [2, 4, 4]  # each chunk again in the backward (recomputed)
    with pytest.raises(ValueError, match="chunk"):
        head_logprobs(torch.randn(2, 3), head, torch.tensor([1]), 0)


def test_per_sequence_mean_equals_sequence_mean_on_the_masked_positions() -> None:
    g = torch.Generator().manual_seed(2)
    terms = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    sel = mask.bool()
    got = per_sequence_mean(terms[sel], sel.nonzero()[:, 0], 3)
    torch.testing.assert_close(got, sequence_mean(terms, mask))
