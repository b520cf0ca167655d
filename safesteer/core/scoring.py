"""Teacher scoring: log-probs at the safety ids without holding full-vocabulary logits for a batch.

The decoder body runs once over the batch; the LM head and the float32 log-softmax then run over
``chunk_size`` positions at a time, and only the gathered columns are kept. Outputs are aligned
with the targets: position ``t`` predicts ``input_ids[:, t + 1]``, so T = L - 1.
"""

from __future__ import annotations

import torch

TEACHER_OUTPUTS = ("ids", "topk", "full", "target")


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def right_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for right-padded rows: 0..n-1 on real tokens (pads get their index too; they are masked)."""
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)


@torch.no_grad()
def teacher_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    output: str = "ids",
    ids: torch.Tensor | None = None,
    k: int = 0,
    chunk_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Teacher log-probs for right-padded sequences (B,L), aligned with the targets (T = L-1).

    output="ids": ``{"logprobs": (B,T,K)}`` at the global ``ids`` (K,).
    output="topk": ``{"ids": (B,T,k), "logprobs": (B,T,k)}``, the teacher's own top-k per position.
    output="full": ``{"logprobs": (B,T,V)}`` (the full-vocabulary ablation; large).
    output="target": ``{"logprobs": (B,T)}`` at the next token of each sequence (for k1/k3).
    Any steering hook registered on ``model`` applies.
    """
    if output not in TEACHER_OUTPUTS:
        raise ValueError(f"unknown teacher output {output!r}; choose one of {TEACHER_OUTPUTS}")
    if output == "ids" and ids is None:
        raise ValueError("output='ids' needs the safety ids")
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=right_padded_positions(attention_mask),
    ).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ids": []}
    for s in range(0, hidden.shape[1], chunk_size):
        logits = _head_logits(model, hidden[:, s : s + chunk_size])
        lp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        if output == "ids":
            parts["logprobs"].append(lp.index_select(-1, ids.to(lp.device)))
        elif output == "topk":
            vals, idx = lp.topk(k, dim=-1)
            parts["logprobs"].append(vals)
            parts["ids"].append(idx)
        elif output == "full":
            parts["logprobs"].append(lp)
        else:
            parts["logprobs"].append(lp.gather(-1, targets[:, s : s + chunk_size].unsqueeze(-1)).squeeze(-1))
    return {key: torch.cat(v, dim=1) for key, v in parts.items() if v}
