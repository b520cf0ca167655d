"""A run's training data, built once: the harmful training prompts and the harmless anchors as
chat-formatted ids, and the plan of which of them each optimizer step trains on."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from safesteer.core.generation import chat_texts, reasoning_ids
from safesteer.data import Prompt, load_sets
from safesteer.errors import SafeSteerError

log = logging.getLogger(__name__)


def chat_prompts(
    tok, source, max_tokens: int, limit: int | None = None, what: str = "training"
) -> tuple[list[Prompt], list[list[int]], int]:
    """The prompts of a set (or list of sets) and their chat-formatted ids; prompts longer than
    ``max_tokens`` (``model.max_prompt_tokens``) are skipped and counted. Returns (prompts, ids, skipped)."""
    prompts = load_sets(source, limit=limit)
    ids = [
        tok(t, add_special_tokens=False)["input_ids"]
        for t in chat_texts(tok, [p.instruction for p in prompts])
    ]
    keep = [i for i, x in enumerate(ids) if len(x) <= max_tokens]
    skipped = len(prompts) - len(keep)
    if skipped:
        log.warning("skipped %d %s prompts longer than model.max_prompt_tokens=%d", skipped, what, max_tokens)
    return [prompts[i] for i in keep], [ids[i] for i in keep], skipped


def training_prompts(cfg, tok) -> tuple[list[str], list[list[int]], int]:
    """The instructions of ``data.train`` and their chat-formatted ids (too-long ones skipped, counted)."""
    prompts, ids, skipped = chat_prompts(
        tok, cfg.data.train, cfg.model.max_prompt_tokens, cfg.data.train_limit
    )
    return [p.instruction for p in prompts], ids, skipped


def anchor_pairs(train: Sequence[Prompt], anchors: Sequence[Prompt]) -> dict[int, int]:
    """Training prompt index -> anchor index, for the pairs whose ``category`` names exactly one
    prompt on each side (the bundled harmful/benign question pairs share one category per pair)."""
    nt, na = Counter(p.category for p in train), Counter(p.category for p in anchors)
    where = {p.category: j for j, p in enumerate(anchors) if p.category and na[p.category] == 1}
    return {i: where[p.category] for i, p in enumerate(train) if p.category in where and nt[p.category] == 1}


def schedule(n_prompts: int, cfg, n_anchors: int = 0, pairs: dict[int, int] | None = None) -> list[list[int]]:
    """The prompts of each step: a seeded shuffle per epoch, full steps of ``prompts_per_step`` (a
    remainder is dropped).

    With anchors, each step also takes ``trainer.anchors_per_step`` anchor prompts (indices offset by
    ``n_prompts``), cycling through a seeded order of the anchor set. With ``pairs`` (training index
    -> anchor index), a step's anchors are first the pairs of its training prompts (the benign
    question of the same form beside each harmful one), then the cycle.
    """
    per = cfg.trainer.prompts_per_step
    steps: list[list[int]] = []
    for epoch in range(cfg.trainer.epochs):
        order = list(range(n_prompts))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        steps += [order[i : i + per] for i in range(0, n_prompts - per + 1, per)]
    if cfg.trainer.max_steps is not None:
        steps = steps[: cfg.trainer.max_steps]
    if not steps:
        raise SafeSteerError(
            f"trainer.prompts_per_step={per}: larger than the {n_prompts} usable training prompts, no step to run"
        )
    a = cfg.trainer.anchors_per_step if n_anchors else 0
    if not a:
        return steps
    order = list(range(n_anchors))
    random.Random(f"anchors:{cfg.seed}").shuffle(order)
    cursor = 0
    for step in steps:
        chosen = [pairs[p] for p in step if pairs and p in pairs][:a]
        while len(chosen) < a:
            j = order[cursor % n_anchors]
            cursor += 1
            if j not in chosen or n_anchors < a:
                chosen.append(j)
        step += [n_prompts + j for j in chosen]
    return steps


@dataclass
class TrainingData:
    """The prompts the plan indexes (the training prompts, then the anchors) and the plan."""

    instructions: list[str]
    ids: list[list[int]]  # chat-formatted prompt ids
    n_train: int  # indices below are training prompts (the teacher steers them), the rest anchors
    plan: list[list[int]]  # per optimizer step, the indices of its prompts
    skipped: int  # training prompts left out as too long
    pad_id: int
    think: tuple[int, int] | None  # the <think> and </think> ids (not trained), if the tokenizer has them

    @classmethod
    def build(cls, cfg, tok) -> TrainingData:
        """``data.train`` (and ``data.anchor`` when ``trainer.anchors_per_step`` > 0) for ``tok``'s chat
        template; a malformed or empty set fails here, before any actor starts."""
        max_tokens = cfg.model.max_prompt_tokens
        train, ids, skipped = chat_prompts(tok, cfg.data.train, max_tokens, cfg.data.train_limit)
        anchors, anchor_ids, pairs = [], [], {}
        if cfg.data.anchor and cfg.trainer.anchors_per_step:
            anchors, anchor_ids, _ = chat_prompts(tok, cfg.data.anchor, max_tokens, what="anchor")
            if not anchors:
                raise SafeSteerError(f"data.anchor={cfg.data.anchor}: no usable prompt")
            pairs = anchor_pairs(train, anchors) if cfg.trainer.pair_anchors else {}
            if cfg.trainer.pair_anchors and not pairs:
                log.warning(
                    "trainer.pair_anchors: no training prompt shares its category with exactly one anchor, "
                    "so anchors follow the usual cycle (the bundled pairs: train_harmful_questions with "
                    "anchor_benign_questions)"
                )
        return cls(
            instructions=[p.instruction for p in train + anchors],
            ids=ids + anchor_ids,
            n_train=len(train),
            plan=schedule(len(train), cfg, len(anchors), pairs),
            skipped=skipped,
            pad_id=tok.pad_token_id,
            think=reasoning_ids(tok),
        )
