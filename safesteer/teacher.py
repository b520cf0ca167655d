"""Teacher actors: the frozen student copy with the steering hook (or a safety system prompt).

A teacher scores the student's on-policy samples and returns log-probs at the safety ids only,
completion-aligned (B, C, K): full-vocabulary logits never leave the actor (except for the
``full``-vocabulary loss ablation, which needs them).

Which prompts are steered toward refusal (``teacher.gate``): ``label``, the training prompts
(``data.train``) and not the anchors; ``probe``, the prompts the harm probe flags from the model's
own activations (:mod:`safesteer.core.probe`), whatever set they came from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safesteer.actors import Placement, configure_threads
from safesteer.core.batch import collate, completion_slice
from safesteer.core.generation import chat_texts
from safesteer.core.probe import last_token_states
from safesteer.core.scoring import teacher_logprobs
from safesteer.core.steering import POSITIONS, TEACHER_KINDS, Teacher, load_vector_bytes, prompt_mask
from safesteer.core.tokens import SafetyTokens
from safesteer.errors import SafeSteerError
from safesteer.models import load_hf
from safesteer.schema import option, require


@dataclass
class TeacherConfig(Placement):
    """``teacher``: the frozen steered teacher (conf/teacher)."""

    kind: str = option(choices=TEACHER_KINDS)
    anchor_coeff: float = option()
    gate: str = option(choices=("label", "probe"))
    coeff: float | None = option()
    positions: str = option(choices=POSITIONS)
    system_prompt: str | None = option()
    topk: int = option(ge=1)
    num_actors: int = option(ge=1)
    chunk_size: int = option(ge=1)
    batch_size: int = option(ge=1)
    bf16: bool = option()

    @staticmethod
    def rules(cfg) -> None:
        t = cfg.teacher
        why = "the harm probe gates a steering vector (teacher.kind=vector)"
        require(t.gate == "label" or t.kind == "vector", "teacher.gate", t.gate, why)


# What the teacher must return for each loss mode of the learner.
OUTPUT_FOR_LOSS = {
    "partial": "ids",
    "bucket": "ids",
    "topk": "topk",
    "full": "full",
    "k1": "target",
    "k3": "target",
}


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
    chunk_size: int = 64,
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
                    chunk_size,
                )
            for key, v in out.items():
                v = completion_slice(v, b["prompt_lens"], b["completion_lens"])
                if key not in full:
                    full[key] = v.new_zeros((len(steer), C, *v.shape[2:]))
                full[key][rows[s : s + batch_size], : v.shape[1]] = v
    return full


class TeacherWorker:
    """Holds the frozen teacher (wrapped by ``ray.remote`` in :mod:`safesteer.actors`)."""

    def __init__(
        self,
        model_path: str,
        cfg: TeacherConfig,
        vector_blob: bytes | None,
        tokens: SafetyTokens | None,
        output: str,
        trust_remote_code: bool = False,
    ):
        configure_threads(cfg.threads)
        self.model, self.tok = load_hf(model_path, dtype="float32", trust_remote_code=trust_remote_code)
        if torch.cuda.is_available():
            self.model.cuda()
        kw = {"system_prompt": cfg.system_prompt} if cfg.system_prompt else {}
        vec = load_vector_bytes(vector_blob) if vector_blob is not None else None
        coeff = None if cfg.coeff is None else float(cfg.coeff)
        self.teacher = Teacher(
            kind=cfg.kind,
            vector=vec,
            anchor_coeff=float(cfg.anchor_coeff),
            coeff=coeff,
            positions=cfg.positions,
            **kw,
        )
        self.probe = None
        if cfg.gate == "probe":
            if vec is None or vec.probe is None:
                raise SafeSteerError("teacher.gate=probe needs a steering vector file with a harm probe")
            self.probe = vec.probe
        self.tokens = tokens
        self.ids = torch.tensor(tokens.ids, device=self.model.device) if tokens is not None else None
        self.output, self.cfg = output, cfg

    def safety_tokens_hash(self) -> str | None:
        """The content hash of the safety tokens this teacher scores (checked against the driver's)."""
        return self.tokens.content_hash() if self.tokens is not None else None

    def score(
        self,
        instructions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        steer: Sequence[bool] | None = None,
    ) -> dict:
        t = time.perf_counter()
        gate = None
        if self.probe is not None:  # the probe decides which prompts are steered; labels are ignored
            steer = gate = self.flag_harmful(instructions)
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            out = score_completions(
                self.model,
                self.tok,
                self.teacher,
                instructions,
                completion_ids,
                self.output,
                self.ids,
                self.cfg.topk,
                self.cfg.chunk_size,
                self.cfg.batch_size,
                steer,
            )
        out = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}
        if "logprobs" in out and out["logprobs"].dim() == 3 and self.output == "full":
            out["logprobs"] = out["logprobs"].to(torch.bfloat16)  # the ablation's (B,C,V) payload, halved
        tokens = sum(len(c) for c in completion_ids)
        return {"teacher": out, "seconds": time.perf_counter() - t, "tokens": tokens, "gate": gate}

    @torch.no_grad()
    def flag_harmful(self, instructions: Sequence[str]) -> list[bool]:
        """The harm probe's verdict on each prompt (the student's chat-formatted prompt, unsteered)."""
        unique = list(dict.fromkeys(instructions))
        ids = [self.tok(x, add_special_tokens=False)["input_ids"] for x in chat_texts(self.tok, unique)]
        states = last_token_states(self.model, ids, [self.probe.layer], self.cfg.batch_size)
        flags = dict(zip(unique, self.probe.flags(states[self.probe.layer]).tolist()))
        return [flags[x] for x in instructions]

    def pid(self) -> int:
        return os.getpid()
