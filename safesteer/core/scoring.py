"""Teacher scoring: log-probs at the safety ids without holding full-vocabulary logits for a batch.

The decoder body runs once over the batch; the LM head and the float32 log-softmax then run over
``logits_chunk`` positions at a time, and only the gathered columns are kept. Outputs are aligned
with the targets: position ``t`` predicts ``input_ids[:, t + 1]``, so T = L - 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safesteer.core.batch import collate, completion_slice
from safesteer.core.steering import Teacher, prompt_mask

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
    logits_chunk: int = 64,
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
    for s in range(0, hidden.shape[1], logits_chunk):
        logits = _head_logits(model, hidden[:, s : s + logits_chunk])
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
            parts["logprobs"].append(
                lp.gather(-1, targets[:, s : s + logits_chunk].unsqueeze(-1)).squeeze(-1)
            )
    return {key: torch.cat(v, dim=1) for key, v in parts.items() if v}


def teacher_prompt_ids(
    tok, teacher: Teacher, instructions: Sequence[str], steer: bool = True
) -> list[list[int]]:
    return [
        tok(t, add_special_tokens=False)["input_ids"] for t in teacher.prompt_texts(tok, instructions, steer)
    ]


@torch.no_grad()
def score_completions(
    model,
    tok,
    teacher: Teacher,
    instructions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    output: str,
    ids: torch.Tensor | None = None,
    k: int = 0,
    logits_chunk: int = 64,
    batch_size: int = 16,
    steer: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher log-probs over each completion, completion-aligned: position j predicts completion token j.

    Returns ``{"logprobs": (B,C,K)}`` (plus ``"ids"`` for top-K), C = longest completion.
    The teacher sees its own prompt (with the system prompt for that kind) followed by the completion.
    ``steer[b]=False`` scores sequence ``b`` with the original model instead (an anchor prompt).
    """
    steer = [True] * len(instructions) if steer is None else list(steer)
    if len(steer) != len(instructions):
        raise ValueError("steer and instructions differ in length")
    C = max(len(c) for c in completion_ids)
    full: dict[str, torch.Tensor] = {}
    for flag in (True, False):
        rows = [b for b, s in enumerate(steer) if s == flag]
        if not rows:
            continue
        prompts = teacher_prompt_ids(tok, teacher, [instructions[b] for b in rows], flag)
        comps = [completion_ids[b] for b in rows]
        for s in range(0, len(rows), batch_size):
            b = collate(prompts[s : s + batch_size], comps[s : s + batch_size], tok.pad_token_id)
            mask = prompt_mask(b["prompt_lens"], b["input_ids"].shape[1])
            with teacher.apply(model, flag, mask):
                out = teacher_logprobs(
                    model,
                    b["input_ids"].to(model.device),
                    b["attention_mask"].to(model.device),
                    output,
                    ids,
                    k,
                    logits_chunk,
                )
            for key, v in out.items():
                v = completion_slice(v, b["prompt_lens"], b["completion_lens"])
                if key not in full:
                    full[key] = v.new_zeros((len(steer), C, *v.shape[2:]))
                full[key][rows[s : s + batch_size], : v.shape[1]] = v
    return full
