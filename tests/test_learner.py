"""The learner's student module: the localized loss through the chunked LM head equals the loss
written the plain way (the model's full logits, then the loss), value and gradient, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from safesteer.core.loss import localized_reverse_kl_terms, sequence_mean
from safesteer.core.scoring import right_padded_positions
from safesteer.learner import LocalizedStudent


def _batch(vocab: int, K: int, mode: str):
    g = torch.Generator().manual_seed(3)
    B, T = 3, 9
    input_ids = torch.randint(0, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    completion = torch.zeros(B, T - 1)
    completion[0, 3:] = 1
    completion[1, 4:6] = 1
    completion[2, 2:] = 1
    ids = torch.randperm(vocab, generator=g)[:K]
    teacher_ids = torch.randint(0, vocab, (B, T - 1, K), generator=g) if mode == "topk" else None
    shape = (B, T - 1) if mode in ("k1", "k3") else (B, T - 1, K)
    teacher = torch.log_softmax(torch.randn(B, T - 1, vocab, generator=g), -1)
    if mode in ("k1", "k3"):
        t_lp = torch.gather(teacher, -1, input_ids[:, 1:, None]).squeeze(-1)
    elif mode == "topk":
        t_lp = torch.gather(teacher, -1, teacher_ids)
    else:
        t_lp = teacher[..., ids]
    assert t_lp.shape == shape
    return input_ids, attention_mask, completion, t_lp, teacher_ids, ids


@pytest.mark.parametrize("mode", ["partial", "bucket", "topk", "k1", "k3"])
def test_the_chunked_head_loss_equals_the_full_logits_loss(tiny, mode: str) -> None:
    model, _ = tiny
    model.float().train()
    input_ids, attention_mask, completion, t_lp, teacher_ids, ids = _batch(model.config.vocab_size, 5, mode)
    student = LocalizedStudent(model, ids, mode, False, False, chunk=4)
    per_seq, mass = student(input_ids, attention_mask, completion, t_lp, teacher_ids)
    grads = torch.autograd.grad(per_seq.sum(), list(model.parameters()))

    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=right_padded_positions(attention_mask),
    ).logits[:, :-1]
    gathered = teacher_ids if mode == "topk" else ids
    terms = localized_reverse_kl_terms(logits, t_lp, gathered, mode, False, target_ids=input_ids[:, 1:])
    want = sequence_mean(terms, completion)
    want_grads = torch.autograd.grad(want.sum(), list(model.parameters()))

    torch.testing.assert_close(per_seq, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    probs = torch.softmax(logits.detach().float(), -1)[..., ids].sum(-1)
    assert mass.item() == pytest.approx((probs * completion).sum().item() / completion.sum().item(), rel=1e-4)
