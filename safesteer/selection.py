"""Validation during distillation, and model selection: keep the most selective weights.

After the last step, and every ``trainer.select.every`` steps when that is set, the student answers
held-aside validation prompts greedily through the rollout engine, and the offline judge scores

    selectivity = refusal(harmful validation) - refusal(harmless validation) - degenerate(both)

With ``every`` set, the best step's weights (with LoRA: its adapter factors) are written to
``<run dir>/best/`` (safetensors, atomically) and are what the run evaluates and exports; with ``every=0`` the last step is exported
and its validation scores are reported (settings are chosen on these, never on evaluation sets).
The validation prompts are never evaluation prompts.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safesteer.core import judge
from safesteer.core.lora import is_factor_blob
from safesteer.data.training import chat_prompts
from safesteer.paths import atomic_dir, atomic_write_text
from safesteer.schema import option


@dataclass
class SelectConfig:
    """``trainer.select``: validation during training and the exported step (conf/trainer)."""

    every: int = option(ge=0)
    harmful: Any = option()
    harmless: Any = option()
    max_new_tokens: int = option(ge=1)


log = logging.getLogger(__name__)

BEST_DIR, WEIGHTS, FACTORS, INFO = "best", "model.safetensors", "lora_factors.safetensors", "best.json"
ANSWERS = "validation_answers.jsonl"  # the latest validation's answers and verdicts


def selectivity(harmful: list[str], harmless: list[str]) -> dict:
    """Judge the validation answers: refusal rates, degenerate rate and the selectivity score."""
    rh, rb = judge.rates(harmful), judge.rates(harmless)
    n = rh["n"] + rb["n"]
    degenerate = (rh["degenerate"] * rh["n"] + rb["degenerate"] * rb["n"]) / n if n else 0.0
    return {
        "val_harmful_refusal": rh["refusal"],
        "val_harmless_refusal": rb["refusal"],
        "val_degenerate": degenerate,
        "selectivity": rh["refusal"] - rb["refusal"] - degenerate,
    }


@dataclass
class Selector:
    """Validates the rollout engine's current weights; with ``every`` > 0 keeps the best."""

    run_dir: Path
    every: int
    harmful_ids: list[list[int]]
    harmless_ids: list[list[int]]
    max_new_tokens: int
    decode: Callable[[list[int]], str]  # answer ids -> text
    best_step: int | None = None
    best_score: float = float("-inf")

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / BEST_DIR

    def restore(self) -> None:
        """The best so far of an interrupted run (its ``best/`` directory), if any."""
        info = self.path / INFO
        if info.is_file():
            d = json.loads(info.read_text())
            self.best_step, self.best_score = d["step"], d["selectivity"]

    def due(self, step: int, total: int) -> bool:
        return step == total or (bool(self.every) and step % self.every == 0)

    @classmethod
    def build(cls, cfg, tok, run_dir: Path) -> Selector:
        """The validation prompts of ``trainer.select`` for ``tok``'s chat template."""
        sel, max_tokens = cfg.trainer.select, cfg.model.max_prompt_tokens
        _, harmful, _ = chat_prompts(tok, sel.harmful, max_tokens, what="selection")
        _, harmless, _ = chat_prompts(tok, sel.harmless, max_tokens, what="selection")
        decode = functools.partial(tok.decode, skip_special_tokens=True)
        return cls(run_dir, sel.every, harmful, harmless, sel.max_new_tokens, decode)

    def validate(self, step: int, greedy, export) -> dict:
        """Answer the validation prompts with ``greedy(prompt_ids, max_tokens)``; when the step is the
        most selective so far, write ``export()`` (safetensors bytes) to ``best/``."""
        ids = greedy(self.harmful_ids + self.harmless_ids, self.max_new_tokens)
        texts = [self.decode(x) for x in ids]
        m = selectivity(texts[: len(self.harmful_ids)], texts[len(self.harmful_ids) :])
        kinds = ["harmful"] * len(self.harmful_ids) + ["harmless"] * len(self.harmless_ids)
        atomic_write_text(
            Path(self.run_dir) / ANSWERS,
            "".join(
                json.dumps({"step": step, "kind": k, "answer": t, "label": judge.judge(t).label}) + "\n"
                for k, t in zip(kinds, texts)
            ),
        )
        if self.every and m["selectivity"] > self.best_score:
            self.best_step, self.best_score = step, m["selectivity"]
            with atomic_dir(self.path) as tmp:
                blob = export()  # with LoRA, the adapter's factors (safesteer.core.lora)
                (tmp / (FACTORS if is_factor_blob(blob) else WEIGHTS)).write_bytes(blob)
                (tmp / INFO).write_text(json.dumps({"step": step, **m}))
            log.info(
                "step %d: selectivity %.3f, the best so far (weights in %s)",
                step,
                m["selectivity"],
                self.path,
            )
        return {**m, "best_step": self.best_step} if self.every else m

    def score(self, greedy) -> dict:
        """The selectivity scores of the engine's current weights (nothing written)."""
        ids = greedy(self.harmful_ids + self.harmless_ids, self.max_new_tokens)
        texts = [self.decode(x) for x in ids]
        return selectivity(texts[: len(self.harmful_ids)], texts[len(self.harmful_ids) :])

    def best_weights(self) -> bytes | None:
        """The best step's weights, or its LoRA factors."""
        if self.best_step is None:
            return None
        factors = self.path / FACTORS
        return (factors if factors.is_file() else self.path / WEIGHTS).read_bytes()
