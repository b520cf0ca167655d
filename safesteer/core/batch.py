"""On-policy batches: prompt + completion token ids packed into right-padded tensors.

Alignment convention used everywhere: position ``t`` of a (B, L-1, ...) tensor belongs to the
prediction of ``input_ids[:, t + 1]``; ``completion_mask[b, t]`` is 1 when that token is part of
the completion (the tokens the student generated, end-of-turn included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safesteer.core.generation import reasoning_length


def collate(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    skip: Sequence[int] | None = None,
) -> dict:
    """Pack sequences: ``input_ids``/``attention_mask`` (B,L), ``completion_mask`` (B,L-1) and lengths (B,).
    ``skip[b]`` leading completion tokens of sequence ``b`` (a reasoning block) stay out of the mask."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    lens = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    B, L = len(lens), max(lens)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    completion_mask = torch.zeros((B, L - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        seq = list(p) + list(c)
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
        completion_mask[b, len(p) - 1 + (skip[b] if skip else 0) : len(seq) - 1] = 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "prompt_lens": torch.tensor([len(p) for p in prompt_ids]),
        "completion_lens": torch.tensor([len(c) for c in completion_ids]),
    }


def completion_slice(
    x: torch.Tensor, prompt_lens: torch.Tensor, completion_lens: torch.Tensor
) -> torch.Tensor:
    """From a sequence-aligned (B,L-1,...) tensor take the completion positions: (B,Cmax,...), zero-padded."""
    B, C = x.shape[0], int(completion_lens.max())
    out = x.new_zeros((B, C, *x.shape[2:]))
    for b in range(B):
        s, n = int(prompt_lens[b]) - 1, int(completion_lens[b])
        out[b, :n] = x[b, s : s + n]
    return out


def to_sequence_positions(
    y: torch.Tensor, prompt_lens: torch.Tensor, completion_lens: torch.Tensor, length: int
) -> torch.Tensor:
    """Inverse of :func:`completion_slice`: place completion-aligned (B,C,...) at (B,length-1,...)."""
    B = y.shape[0]
    out = y.new_zeros((B, length - 1, *y.shape[2:]))
    for b in range(B):
        s, n = int(prompt_lens[b]) - 1, int(completion_lens[b])
        out[b, s : s + n] = y[b, :n]
    return out


def split(batch: dict, n: int) -> list[dict]:
    """Split every (B, ...) tensor of ``batch`` into ``n`` equal shards along dim 0 (B % n == 0)."""
    B = next(iter(batch.values())).shape[0]
    if B % n:
        raise ValueError(f"cannot split {B} sequences into {n} equal shards")
    size = B // n
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(n)]


def trim(batch: dict) -> dict:
    """Drop trailing all-padding columns (after a split, a shard may be shorter than the batch)."""
    L = int(batch["attention_mask"].sum(-1).max())
    out = {}
    for k, v in batch.items():
        if v.dim() >= 2 and v.shape[1] == batch["attention_mask"].shape[1]:
            out[k] = v[:, :L]
        elif v.dim() >= 2 and v.shape[1] == batch["attention_mask"].shape[1] - 1:
            out[k] = v[:, : L - 1]
        else:
            out[k] = v
    return out


def interleave(shards: Sequence[Sequence], n: int | None = None) -> list:
    """Inverse of dealing items round-robin over ``len(shards)`` workers (item ``i`` to worker
    ``i % W``): the items back in their original order."""
    W = len(shards)
    out = [None] * (n if n is not None else sum(len(s) for s in shards))
    for w, shard in enumerate(shards):
        out[w::W] = shard
    return out


def merge_teacher_shards(shards: Sequence[dict], batch_size: int) -> dict:
    """The teachers' outputs (each a dict of (B_w, C_w, ...) tensors, sequences dealt round-robin)
    as one (B, C, ...) dict in batch order, zero-padded to the longest completion."""
    merged = {}
    W = len(shards)
    for key, first in shards[0].items():
        C = max(s[key].shape[1] for s in shards)
        full = torch.zeros((batch_size, C, *first.shape[2:]), dtype=first.dtype)
        for w, s in enumerate(shards):
            full[w::W, : s[key].shape[1]] = s[key]
        merged[key] = full
    return merged


def assemble(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    steered: Sequence[bool],
    teacher: dict,
    pad_id: int,
    anchor_weight: float,
    think: tuple[int, int] | None = None,
) -> dict:
    """One training batch: the packed sequences (:func:`collate`), the teacher's completion-aligned
    outputs moved to sequence positions, and per-sequence ``anchor`` flags and loss ``weight``
    (training prompts, which the teacher steered, weigh 1; harmless anchors ``anchor_weight``).
    With ``think`` (the ``<think>``/``</think>`` ids) a completion's reasoning block is not trained:
    the loss sees the answer only."""
    skip = [reasoning_length(c, think) for c in completion_ids] if think else None
    batch = collate(prompt_ids, completion_ids, pad_id, skip)
    batch["anchor"] = torch.tensor([0.0 if s else 1.0 for s in steered])
    batch["weight"] = torch.tensor([1.0 if s else anchor_weight for s in steered])
    L = batch["input_ids"].shape[1]
    for key, name in (("logprobs", "teacher_logprobs"), ("ids", "teacher_ids")):
        if key in teacher:
            batch[name] = to_sequence_positions(
                teacher[key], batch["prompt_lens"], batch["completion_lens"], L
            )
    return batch
