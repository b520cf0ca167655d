"""Tests for safesteer.core.scoring: chunked teacher log-probs against a plain per-sequence forward."""

from __future__ import annotations

import pytest
import torch

from safesteer.core.generation import chat_texts
from safesteer.core.scoring import teacher_logprobs
from safesteer.core.steering import steering

IDS = torch.tensor([57, 339, 2, 100, 4000, 49151])


@pytest.fixture(scope="module")
def batch(tiny):
    """A right-padded batch of prompt + completion sequences of different lengths."""
    _, tok = tiny
    texts = [
        chat_texts(tok, ["Hi"])[0] + "Hello! How can I help?",
        chat_texts(tok, ["Tell me about the moon and its phases, please."])[0] + "The moon",
        chat_texts(tok, ["2+2?"])[0] + "4",
    ]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(map(len, seqs))
    assert len({len(s) for s in seqs}) == 3
    input_ids = torch.full((3, L), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((3, L), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention_mask[b, : len(s)] = 1
    return input_ids, attention_mask, seqs


def _alone(model, seq: list[int]) -> torch.Tensor:
    """Full log-softmax (n-1, V) of one unpadded sequence, aligned with its targets."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("logits_chunk", [3, 1000])
def test_ids_output_matches_the_full_forward(tiny, batch, logits_chunk: int) -> None:
    model, _ = tiny
    input_ids, attention_mask, seqs = batch
    out = teacher_logprobs(model, input_ids, attention_mask, output="ids", ids=IDS, logits_chunk=logits_chunk)
    assert set(out) == {"logprobs"}
    lp = out["logprobs"]
    assert lp.shape == (3, input_ids.shape[1] - 1, len(IDS)) and lp.dtype == torch.float32
    assert not lp.requires_grad
    for b, s in enumerate(seqs):
        ref = _alone(model, s)[:, IDS]
        torch.testing.assert_close(lp[b, : len(s) - 1].double(), ref, rtol=1e-4, atol=1e-4)


def test_chunk_sizes_agree(tiny, batch) -> None:
    model, _ = tiny
    input_ids, attention_mask, _ = batch
    outs = [
        teacher_logprobs(model, input_ids, attention_mask, output="ids", ids=IDS, logits_chunk=c)["logprobs"]
        for c in (1, 3, 7, 1000)
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


def test_topk_output_is_the_top_k_of_the_full_log_softmax(tiny, batch) -> None:
    model, _ = tiny
    input_ids, attention_mask, seqs = batch
    k = 5
    out = teacher_logprobs(model, input_ids, attention_mask, output="topk", k=k, logits_chunk=4)
    assert out["ids"].shape == out["logprobs"].shape == (3, input_ids.shape[1] - 1, k)
    for b, s in enumerate(seqs):
        n = len(s) - 1
        ref = _alone(model, s)
        ref_vals, ref_ids = ref.topk(k, dim=-1)
        torch.testing.assert_close(out["logprobs"][b, :n].double(), ref_vals, rtol=1e-4, atol=1e-4)
        # the returned ids carry the returned values under the reference too
        torch.testing.assert_close(
            torch.gather(ref, -1, out["ids"][b, :n]), out["logprobs"][b, :n].double(), rtol=1e-4, atol=1e-4
        )
        # and they are the reference top-k wherever the k-th and (k+1)-th values are not tied
        sorted_ref = ref.sort(-1, descending=True).values
        clear = (sorted_ref[:, k - 1] - sorted_ref[:, k]) > 1e-4
        assert clear.any()
        for t in torch.nonzero(clear).flatten().tolist():
            assert set(out["ids"][b, t].tolist()) == set(ref_ids[t].tolist())


def test_target_output_is_the_log_prob_of_the_next_token(tiny, batch) -> None:
    model, _ = tiny
    input_ids, attention_mask, seqs = batch
    out = teacher_logprobs(model, input_ids, attention_mask, output="target", logits_chunk=5)["logprobs"]
    assert out.shape == (3, input_ids.shape[1] - 1)
    for b, s in enumerate(seqs):
        ref = _alone(model, s).gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(out[b, : len(s) - 1].double(), ref, rtol=1e-4, atol=1e-4)


def test_full_output_is_the_full_log_softmax(tiny, batch) -> None:
    model, _ = tiny
    input_ids, attention_mask, seqs = batch
    out = teacher_logprobs(model, input_ids, attention_mask, output="full", logits_chunk=6)["logprobs"]
    assert out.shape == (3, input_ids.shape[1] - 1, model.config.vocab_size)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(out[b, : len(s) - 1].double(), _alone(model, s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(out.shape[:2]), rtol=0, atol=1e-4)


def test_a_steering_hook_around_the_call_applies(tiny, batch) -> None:
    model, _ = tiny
    input_ids, attention_mask, seqs = batch
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    base = teacher_logprobs(model, input_ids, attention_mask, output="ids", ids=IDS, logits_chunk=3)[
        "logprobs"
    ]
    with steering(model, 2, v, 1.0):
        steered = teacher_logprobs(model, input_ids, attention_mask, output="ids", ids=IDS, logits_chunk=3)
        refs = [_alone(model, s)[:, IDS] for s in seqs]
    steered = steered["logprobs"]
    real = attention_mask[:, 1:].bool()
    assert (steered - base)[real].abs().max() > 1e-3
    for b, s in enumerate(seqs):
        torch.testing.assert_close(steered[b, : len(s) - 1].double(), refs[b], rtol=1e-4, atol=1e-4)
    after = teacher_logprobs(model, input_ids, attention_mask, output="ids", ids=IDS, logits_chunk=3)[
        "logprobs"
    ]
    assert torch.equal(after, base)


def test_bad_arguments(tiny, batch) -> None:
    model, _ = tiny
    input_ids, attention_mask, _ = batch
    with pytest.raises(ValueError, match="unknown teacher output"):
        teacher_logprobs(model, input_ids, attention_mask, output="logits")
    with pytest.raises(ValueError, match="needs the safety ids"):
        teacher_logprobs(model, input_ids, attention_mask, output="ids")


def test_bf16_teacher_stays_within_bf16_tolerance(default_model_dir) -> None:
    """``teacher.bf16``: on the real model, bf16 autocast moves the teacher's log-probs at the safety ids
    by about 0.06 nats on average and the localized loss of a fixed batch by about 5% (measured);
    the bounds leave 2x room. The student is far enough from the teacher for a loss of ~0.015 nats:
    with a much nearer one (loss ~5e-4) bf16 rounding alone moved the loss by 40% on an AMX CPU."""
    from safesteer.core.loss import localized_reverse_kl_terms, sequence_mean
    from safesteer.models import load_hf

    model, tok = load_hf(str(default_model_dir))
    texts = [
        chat_texts(tok, ["How do I pick a lock?"])[0] + "I'm sorry, but I can't help with that. Lock picking",
        chat_texts(tok, ["Write a poem about rain."])[0] + "Rain falls softly on the roof, a gentle song",
    ]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(map(len, seqs))
    ids = torch.full((2, L), tok.pad_token_id)
    am = torch.zeros((2, L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        am[b, : len(s)] = 1
    safety = torch.tensor(
        tok.convert_tokens_to_ids(["I", "Ġsorry", "Sorry", "ĠI", "Ġcan", "'t", "Ġnot", "Ġhelp"])
    )
    with torch.no_grad():
        fp32 = teacher_logprobs(model, ids, am, "ids", safety, 0, 64)["logprobs"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = teacher_logprobs(model, ids, am, "ids", safety, 0, 64)["logprobs"].float()
        student = model(input_ids=ids, attention_mask=am).logits[:, :-1] * 2.0  # a differing student
    mask = am[:, 1:].float()
    assert fp32.dtype == torch.float32 and not torch.equal(fp32, bf16)  # autocast did take effect
    assert (fp32 - bf16).abs()[mask.bool()].mean() < 0.12
    loss = [
        sequence_mean(localized_reverse_kl_terms(student, t, safety, "bucket", False), mask).mean()
        for t in (fp32, bf16)
    ]
    assert abs(loss[1] - loss[0]) <= 0.1 * loss[0]
