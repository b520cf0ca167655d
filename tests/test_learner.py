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


def test_lora_weights_merge_like_peft(tiny_model_dir) -> None:
    """merged_state (what the engines load and the export writes) equals peft's own merge, and the
    LoRA model's forward equals the plain model's forward with the merged weights."""
    import copy

    from transformers import AutoModelForCausalLM

    from safesteer.core.lora import merged_state
    from safesteer.learner import LoraSettings, add_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = copy.deepcopy(base)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = add_lora(model, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # only the adapters train
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # peft starts B at zero: make the adapter do something
    merged = merged_state(model.state_dict(), settings.alpha / settings.r)
    assert set(merged) == set(base.state_dict())
    reference = peft_model.merge_and_unload().state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        base.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )


def test_lora_target_modules_the_model_lacks_are_named(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from safesteer.errors import SafeSteerError
    from safesteer.learner import LoraSettings, add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(SafeSteerError, match=r"learner.lora.target_modules=\['c_attn'\]"):
        add_lora(model, LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=["c_attn"]))
