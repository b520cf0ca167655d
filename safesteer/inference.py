"""Safety at inference time, without training: what a user could deploy instead of a trained model.

A :class:`Deployed` model is the original weights plus one of

- the steering vector, always on (the steered teacher served as the model: the activation-steering
  baseline);
- the steering vector, on only for the prompts the harm probe flags from the model's own activations
  at the last prompt token (harm-gated, or conditional, steering);
- a safety system prompt.

It answers prompts from a vLLM engine with the hook inside its worker (:class:`SteeringEngine`, the
steered teacher's :class:`safesteer.teacher.SteeringExtension`) and scores continuations with the HF
model under the same rule, so the evaluation measures exactly what would be served: refusal rates,
MMLU cloze, KL(original || deployed) and perplexity on the original model's answers, and the cost at
inference (tokens per second of the same engine with the hook against without, on the same prompts).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from safesteer import evaluate
from safesteer.cluster import configure_threads
from safesteer.core.batch import collate
from safesteer.core.generation import chat_texts
from safesteer.core.probe import HarmProbe, last_token_states
from safesteer.core.steering import SteeringVector, steering
from safesteer.data import load_prompts
from safesteer.models import compute_dtype, default_device
from safesteer.rollout import greedy_completions, shut_down
from safesteer.schema import typed
from safesteer.teacher import steering_engine


class SteeringEngine:
    """Greedy answers of the original model from a vLLM engine (sized as ``cfg.rollout`` says), with
    ``vector`` added at its block as :func:`safesteer.core.steering.steering` adds it, at the
    coefficient of each call (``extra_len``: room for a system prompt's tokens)."""

    def __init__(self, cfg, model_path: str, vector: SteeringVector | None, extra_len: int = 0):
        device = default_device()
        dtype = compute_dtype(cfg.model.dtype, device)
        self.threads = cfg.rollout.threads
        configure_threads(self.threads)
        self.llm = steering_engine(model_path, typed(cfg.rollout), dtype, cfg.seed, device,
                                   cfg.model.trust_remote_code, vector, extra_len)  # fmt: skip

    def greedy(
        self, prompt_ids: Sequence[Sequence[int]], max_tokens: int, coeff: float = 0.0, positions: str = "all"
    ) -> list[list[int]]:
        """Greedy answers with the vector at ``coeff`` (0: none) on ``positions``: ``all``, or the
        ``prompt`` only (one engine call per prompt length, so one position threshold serves it)."""
        groups: dict[int | None, list[int]] = {}
        for i, p in enumerate(prompt_ids):
            groups.setdefault(len(p) if coeff and positions == "prompt" else None, []).append(i)
        out: list[list[int]] = [[] for _ in prompt_ids]
        try:
            for prompt_len, rows in groups.items():
                self.llm.collective_rpc("safesteer_steer", args=(coeff, prompt_len))
                for i, ids in zip(
                    rows, greedy_completions(self.llm, [prompt_ids[i] for i in rows], max_tokens)
                ):
                    out[i] = ids
        finally:
            self.llm.collective_rpc("safesteer_steer", args=(0.0, None))
        return out

    def close(self) -> None:
        shut_down(self, self.threads)


@dataclass
class Deployed:
    """The original ``model`` served with a steering vector (``coeff`` != 0; gated by ``probe`` when
    given) or with a ``system`` prompt. ``positions`` is where the vector is added (see
    :func:`safesteer.core.steering.steering`). ``model`` (HF) flags and scores; ``engine``, holding
    the same vector, answers (None: scoring only)."""

    model: torch.nn.Module
    tok: object
    engine: SteeringEngine | None = None
    vector: SteeringVector | None = None
    coeff: float = 0.0
    positions: str = "prompt"
    probe: HarmProbe | None = None
    system: str | None = None
    batch_size: int = 16

    def steered(self, instructions: Sequence[str]) -> list[bool]:
        """Which prompts get the vector: none without one, all without a probe, else the flagged ones
        (the probe reads the plain chat prompt, as the gated teacher does)."""
        if self.vector is None or self.coeff == 0:
            return [False] * len(instructions)
        if self.probe is None:
            return [True] * len(instructions)
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(self.tok, instructions)]
        states = last_token_states(self.model, ids, [self.probe.layer], self.batch_size)
        return self.probe.flags(states[self.probe.layer]).tolist()

    def hook(self, mask: torch.Tensor) -> contextlib.AbstractContextManager:
        """The steering hook on the HF model, at the (B, T) positions ``mask`` marks in a scoring pass."""
        v = self.vector
        return steering(self.model, v.layer, v.vector, self.coeff, "prompt", mask)

    def answer(self, instructions: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers (new token ids) from the engine: steered prompts and the others in separate calls."""
        flags = self.steered(instructions)
        ids = self.chat_ids(instructions)
        out: list[list[int]] = [[] for _ in instructions]
        for on in (True, False):
            rows = [i for i, f in enumerate(flags) if f == on]
            if rows:
                got = self.engine.greedy([ids[i] for i in rows], max_new_tokens, self.coeff if on else 0.0,
                                         self.positions)  # fmt: skip
                for i, x in zip(rows, got):
                    out[i] = x
        return out

    @torch.no_grad()
    def completion_logprobs(
        self, contexts: Sequence[list[int]], completions: Sequence[list[int]], flags: Sequence[bool]
    ) -> torch.Tensor:
        """Full-vocabulary log-probs (N, V) at the completion positions, in order, with the vector on
        the flagged rows (at their context's positions, or at every position with ``positions=all``)."""
        b = collate(contexts, completions, self.tok.pad_token_id)
        where = torch.arange(b["input_ids"].shape[1]).unsqueeze(0) < b["prompt_lens"].unsqueeze(1)
        if self.positions == "all":
            where = b["attention_mask"].bool()
        where = (where & torch.tensor(list(flags)).unsqueeze(1)).float().to(self.model.device)
        on = self.vector is not None and self.coeff != 0 and any(flags)
        with self.hook(where) if on else contextlib.nullcontext():
            return evaluate._completion_logprobs(self.model, b)

    def chat_ids(self, instructions: Sequence[str]) -> list[list[int]]:
        return [
            self.tok(t, add_special_tokens=False)["input_ids"]
            for t in chat_texts(self.tok, instructions, self.system)
        ]

    def mmlu_cloze(self, items: Sequence) -> float:
        """MMLU zero-shot cloze, as :func:`safesteer.evaluate.mmlu_cloze_accuracy` scores the original
        model, under the deployment: the vector on the question's positions when the question (as a
        chat prompt) is steered; the system prompt, if any, before the question."""
        flags = self.steered([it.instruction for it in items])
        prefix = f"{self.system}\n\n" if self.system else ""
        correct = 0
        for it, on in tqdm(
            list(zip(items, flags)), desc="MMLU (cloze, deployed)", unit="question", leave=False
        ):
            ctx = self.tok(f"{prefix}Question: {it.instruction.strip()}\nAnswer:", add_special_tokens=False)[
                "input_ids"
            ]
            conts = [" " + str(c).strip() for c in it.extra["choices"]]
            cont_ids = [self.tok(c, add_special_tokens=False)["input_ids"] for c in conts]
            lp = self.completion_logprobs([ctx] * len(conts), cont_ids, [on] * len(conts))
            scores, i = [], 0
            for c, ids in zip(conts, cont_ids):
                rows = lp[i : i + len(ids)]
                scores.append(
                    float(rows.gather(-1, torch.tensor(ids).unsqueeze(-1)).sum()) / max(len(c.encode()), 1)
                )
                i += len(ids)
            correct += int(max(range(len(scores)), key=scores.__getitem__) == it.extra["answer"])
        return correct / max(len(items), 1)


@torch.no_grad()
def kl_and_perplexity(
    base: Deployed, served: Deployed, prompts: list[str], answers: list[list[int]], batch_size: int = 8
) -> dict:
    """Per-token KL(original || deployed) and perplexities on the original model's answers: each model
    reads the answer after its own prompt (the deployed one with its system prompt or vector)."""
    keep = [i for i, a in enumerate(answers) if a]
    flags = served.steered([prompts[i] for i in keep])

    def scored():
        for s in tqdm(range(0, len(keep), batch_size), desc="KL and perplexity", unit="batch", leave=False):
            rows = keep[s : s + batch_size]
            ins, ans = [prompts[i] for i in rows], [answers[i] for i in rows]
            lb = base.completion_logprobs(base.chat_ids(ins), ans, [False] * len(rows))
            lt = served.completion_logprobs(served.chat_ids(ins), ans, flags[s : s + batch_size])
            yield lb, lt, torch.tensor([t for a in ans for t in a])

    return evaluate.capability_totals(scored())


def throughput(served: Deployed, instructions: Sequence[str], max_new_tokens: int, rounds: int = 3) -> dict:
    """Generation speed (new tokens per second) of the deployment and of the same model without its
    hook or system prompt, on the same prompts, alternating for ``rounds`` rounds: the medians."""
    plain = Deployed(served.model, served.tok, served.engine, batch_size=served.batch_size)
    speeds: dict[str, list[float]] = {"original": [], "deployed": []}
    for _ in range(rounds):
        for name, d in (("original", plain), ("deployed", served)):
            t = time.perf_counter()
            n = sum(len(x) for x in d.answer(instructions, max_new_tokens))
            speeds[name].append(n / (time.perf_counter() - t))
    return {f"tokens_per_s_{k}": statistics.median(v) for k, v in speeds.items()}


def evaluate_deployed(cfg, base_path: str, served: Deployed, answers_path) -> dict:
    """The evaluation :func:`safesteer.evaluate.evaluate` runs on a trained model, on a deployment:
    refusal rates on every evaluation set, MMLU cloze, KL and perplexity against the original, and
    the cost at inference; every answer and verdict written to ``answers_path``."""
    e = cfg.eval
    sets, groups = evaluate.eval_sets(cfg), evaluate.set_groups(cfg)
    # from the cache, else the same engine without the hook
    before_ids = evaluate.original_engine_answers(cfg, base_path, served.tok, sets, served.engine.greedy)
    after_ids = {
        name: served.answer(prompts, e.max_new_tokens)
        for name, prompts in tqdm(sets.items(), desc="answers (deployed)", unit="set")
    }
    dec_b, dec_a, rates_b, rates_a = evaluate.judge_answers(
        served.tok, sets, before_ids, after_ids, answers_path
    )
    mmlu = load_prompts(e.mmlu_set, limit=e.n_mmlu)
    base = Deployed(served.model, served.tok, batch_size=served.batch_size)
    before_mmlu = evaluate.original_mmlu(cfg, base_path, served.model, served.tok, mmlu)
    before = evaluate.side(rates_b, dec_b, groups, before_mmlu)
    cap = kl_and_perplexity(base, served, sets[e.capability_set], before_ids[e.capability_set])
    speed = throughput(served, sets[e.capability_set][:32], e.max_new_tokens)
    after = evaluate.side(rates_a, dec_a, groups, served.mmlu_cloze(mmlu), **cap, **speed)
    return {
        "groups": groups,
        "before": before,
        "after": after,
        "bar": evaluate.bar(cfg, before, after, groups),
    }
