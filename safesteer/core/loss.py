"""Localized on-policy distillation losses.

All functions work on *aligned* tensors: position ``t`` holds the distribution that predicts the
``t``-th target token (``logits[:, :-1]`` predicts ``input_ids[:, 1:]``), and ``mask`` is 1 on
completion tokens. Softmaxes are taken over the full vocabulary in float32, whatever the input dtype.

With S the safety-token set (K ids), the reference SafeSteer term at position t is

    l_t = sum_{v in S} p_s(v) * (log p_s(v) - log p_t(v))                       (``partial``)

and the loss is the mean of l_t over each sequence's completion tokens, then over sequences.
Variants (``mode``):

- ``partial``: the reference term above (it can go negative; its stationary point is p_s = p_t / e on S).
- ``bucket``: ``partial`` plus the complement bucket ``r_s log(r_s / r_t)`` with ``r = 1 - sum_S p``:
  the exact reverse KL between the (K+1)-bucket coarse-grainings; >= 0 and minimised at p_s = p_t on S.
- ``full``: exact reverse KL over the full vocabulary (teacher log-probs are (B,T,V)).
- ``topk``: the ``partial`` term over the teacher's own top-K ids at each position (ids are (B,T,K)).
- ``k1`` / ``k3``: sampled-token estimators on the generated token x_t. ``k1`` is the score-function
  surrogate: its value is ``log p_s(x_t) - log p_t(x_t)`` and its gradient is
  ``(log p_s(x_t) - log p_t(x_t)) * grad log p_s(x_t)``, an unbiased per-token reverse-KL gradient on
  on-policy samples. ``k3`` is ``(r - 1) - log r`` with ``r = p_t(x_t) / p_s(x_t)`` (log r clamped to [-30, 30]), used directly as a loss.

``renormalize=True`` renormalises student and teacher within the gathered ids before ``partial`` /
``topk`` (then each term is a proper KL, >= 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from safesteer.core.batch import trim
from safesteer.core.scoring import right_padded_positions

MODES = ("partial", "bucket", "full", "topk", "k1", "k3")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, numerically stable."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def gather_logprobs(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary float32 log-softmax of ``student_logits`` gathered at ``ids``.

    student_logits: (B,T,V). ids: (K,) global ids, or (B,T,K) per-position ids. Returns (B,T,K).
    """
    logits = student_logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    if ids.dim() == 1:
        picked = logits.index_select(-1, ids)
    else:
        picked = torch.gather(logits, -1, ids)
    return picked - lse


def localized_reverse_kl_terms(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None,
    mode: str = "partial",
    renormalize: bool = False,
    target_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position distillation terms, (B,T) float32.

    student_logits: (B,T,V), any float dtype.
    teacher_logprobs: (B,T,K) full-vocabulary log-probs of the teacher at ``ids`` (``partial``,
      ``bucket``, ``topk``); (B,T,V) for ``full``; (B,T) at the sampled tokens for ``k1``/``k3``.
    ids: (K,) safety ids, or (B,T,K) per-position teacher top-K ids for ``topk``; unused by ``full``/``k1``/``k3``.
    target_ids: (B,T) the sampled tokens, for ``k1``/``k3``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}; choose one of {', '.join(MODES)}")
    t_lp = teacher_logprobs.float()
    if mode == "full":
        s_lp = torch.log_softmax(student_logits.float(), dim=-1)
        return (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    if mode in ("k1", "k3"):
        if target_ids is None:
            raise ValueError(f"mode {mode} needs target_ids (the sampled tokens)")
        s_lp = gather_logprobs(student_logits, target_ids.unsqueeze(-1)).squeeze(-1)
        return gathered_terms(s_lp, t_lp, mode)
    if ids is None:
        raise ValueError(f"mode {mode} needs the gathered ids")
    return gathered_terms(gather_logprobs(student_logits, ids), t_lp, mode, renormalize)


def gathered_terms(
    s_lp: torch.Tensor, t_lp: torch.Tensor, mode: str, renormalize: bool = False
) -> torch.Tensor:
    """The per-position term from the student's log-probs already gathered: (..., K) at the safety
    (``partial``, ``bucket``) or top-K (``topk``) ids, or (...) at the sampled tokens (``k1``, ``k3``).
    The leading shape is free ((B,T) or the (N,) selected completion positions)."""
    t_lp = t_lp.float()
    if mode == "k1":
        k = (s_lp - t_lp).detach()
        return k + k * (s_lp - s_lp.detach())
    if mode == "k3":
        log_r = (t_lp - s_lp).clamp(-30.0, 30.0)  # keeps exp finite (masked positions may be extreme)
        return torch.expm1(log_r) - log_r
    if renormalize:
        s_lp = s_lp - torch.logsumexp(s_lp, dim=-1, keepdim=True)
        t_lp = t_lp - torch.logsumexp(t_lp, dim=-1, keepdim=True)
    terms = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    if mode == "bucket":
        if renormalize:
            raise ValueError("mode bucket and renormalize are exclusive (the complement is empty)")
        log_rs = _log1mexp(torch.logsumexp(s_lp, dim=-1))
        log_rt = _log1mexp(torch.logsumexp(t_lp, dim=-1))
        terms = terms + log_rs.exp() * (log_rs - log_rt)
    return terms


def head_logprobs(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Full-vocabulary float32 log-softmax of ``head(hidden)`` gathered at ``ids``, ``chunk`` rows at a
    time (the chunked LM head).

    hidden: (N,D) final hidden states (only the positions that need a distribution). ids: (K,) global
    ids or (N,K) per-row ids. Returns (N,K). The (N,V) logits never exist at once: each chunk's logits
    are freed after its gather and, when gradients are needed, recomputed chunk by chunk in the
    backward (activation checkpointing), so the head's peak is ``chunk x V`` instead of ``N x V``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    grad = torch.is_grad_enabled()
    out = []
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s : s + chunk]
        i = ids if ids.dim() == 1 else ids[s : s + chunk]
        if grad:
            out.append(checkpoint(_head_gather, h, i, head, use_reentrant=False))
        else:
            out.append(_head_gather(h, i, head))
    if not out:
        return hidden.new_zeros((0, ids.shape[-1]), dtype=torch.float32)
    return torch.cat(out)


def _head_gather(h: torch.Tensor, ids: torch.Tensor, head) -> torch.Tensor:
    return gather_logprobs(head(h), ids)


def per_sequence_mean(terms: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of ``terms`` (N,) per sequence, row ``rows[i]`` owning ``terms[i]``: (N,),(N,) -> (n_rows,).

    The selected-positions form of :func:`sequence_mean`; a sequence with no position contributes 0.
    """
    total = terms.new_zeros(n_rows).index_add(0, rows, terms)
    count = terms.new_zeros(n_rows).index_add(0, rows, torch.ones_like(terms))
    return total / count.clamp(min=1.0)


def sequence_mean(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``terms`` over each sequence's masked positions: (B,T),(B,T) -> (B,).

    A sequence with no completion token contributes 0.
    """
    m = mask.to(terms.dtype)
    return (terms * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def localized_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None,
    mask: torch.Tensor,
    mode: str = "partial",
    renormalize: bool = False,
    target_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SafeSteer loss: per-sequence mean over completion tokens, then mean over sequences (scalar)."""
    terms = localized_reverse_kl_terms(student_logits, teacher_logprobs, ids, mode, renormalize, target_ids)
    return sequence_mean(terms, mask).mean()


def safety_mass(student_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over completion positions of the student's probability mass on the safety set (scalar).

    A set with near-zero mass means the localized loss has nothing to act on.
    """
    with torch.no_grad():
        mass = gather_logprobs(student_logits, ids).exp().sum(-1)
        m = mask.to(mass.dtype)
        return (mass * m).sum() / m.sum().clamp(min=1.0)


# -- the student: the loss of one micro-batch, as the learner ranks compute it --------------------


def output_head(lm):
    """The student's head as a function of the final hidden states (with the logit soft-capping of
    the models that have one, e.g. Gemma 2)."""
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


class LocalizedStudent(torch.nn.Module):
    """The student whose forward is the localized loss of one micro-batch, per sequence; this is the
    module DeepSpeed wraps, so the backward starts at the loss and ZeRO's hooks see every parameter.

    The head runs only on completion positions and ``chunk`` of them at a time
    (:func:`head_logprobs`): the float32 full-vocabulary logits of a micro-batch are never
    materialised. ``mode="full"`` needs the whole distribution and computes full logits, as does
    ``chunk=None`` for every mode (the plain way to write the loss, which the benchmarks compare with).
    """

    def __init__(
        self, lm, ids: torch.Tensor | None, mode: str, renormalize: bool, bf16: bool, chunk: int | None
    ):
        super().__init__()
        self.lm = lm
        self.ids, self.mode, self.renormalize, self.bf16, self.chunk = ids, mode, renormalize, bf16, chunk

    def forward(self, input_ids, attention_mask, completion_mask, teacher_logprobs, teacher_ids=None):
        """Returns (per-sequence loss (B,), the student's mean safety-token mass (scalar, no grad))."""
        device, head = input_ids.device.type, output_head(self.lm)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.lm.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=right_padded_positions(attention_mask),
                use_cache=False,
            ).last_hidden_state[:, :-1]
            full = self.mode == "full" or self.chunk is None
            if full:
                logits = head(hidden)
        if full:
            ids = teacher_ids if self.mode == "topk" else self.ids
            terms = localized_reverse_kl_terms(
                logits, teacher_logprobs, ids, self.mode, self.renormalize, target_ids=input_ids[:, 1:]
            )
            mass = safety_mass(logits, self.ids, completion_mask) if self.ids is not None else None
            return sequence_mean(terms, completion_mask), mass
        sel = completion_mask.bool()
        rows = sel.nonzero()[:, 0]
        h = hidden[sel]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16):
            if self.mode in ("k1", "k3"):
                ids = input_ids[:, 1:][sel].unsqueeze(-1)
            else:
                ids = teacher_ids[sel] if self.mode == "topk" else self.ids
            s_lp = head_logprobs(h, head, ids, self.chunk)
            mass = None
            if self.ids is not None:
                with torch.no_grad():
                    own = self.mode in ("partial", "bucket")
                    set_lp = s_lp if own else head_logprobs(h.detach(), head, self.ids, self.chunk)
                    mass = set_lp.exp().sum(-1).mean() if set_lp.numel() else set_lp.new_zeros(())
        if self.mode in ("k1", "k3"):
            s_lp = s_lp.squeeze(-1)
        terms = gathered_terms(s_lp, teacher_logprobs[sel], self.mode, self.renormalize)
        return per_sequence_mean(terms, rows, input_ids.shape[0]), mass


def micro_batch_loss(student, mb: dict, device: str) -> tuple[torch.Tensor, dict]:
    """The localized reverse KL of one micro-batch (``student`` is the DeepSpeed engine around a
    :class:`LocalizedStudent`, or the module itself) and its statistics: the loss sums, the anchors'
    part, the student's safety-token mass."""
    mb = {k: v.to(device) for k, v in trim(mb).items()}
    per_seq, mass = student(
        input_ids=mb["input_ids"],
        attention_mask=mb["attention_mask"],
        completion_mask=mb["completion_mask"],
        teacher_logprobs=mb["teacher_logprobs"],
        teacher_ids=mb.get("teacher_ids"),
    )
    stats = {"loss_sum": per_seq.sum().item(), "sequences": per_seq.numel()}
    if "anchor" in mb:
        stats["anchor_loss_sum"] = (per_seq.detach() * mb["anchor"]).sum().item()
        stats["anchor_sequences"] = int(mb["anchor"].sum().item())
    if mass is not None:
        stats["mass_sum"] = mass.item() * per_seq.numel()
    # Anchor sequences weigh trainer.anchor_weight in the loss (training sequences 1).
    loss = (per_seq * mb["weight"]).mean() if "weight" in mb else per_seq.mean()
    return loss, stats
