"""Refusal directions and the steered teacher.

A *steering vector* r is added, scaled by ``coeff``, to the residual stream at the input of decoder
block ``layer``, at every position (prompt and completion alike). Two ways to find r:

- ``diff_in_means`` (reference): mean(harmful) - mean(harmless) of the block inputs at each
  post-instruction chat-template position, one candidate per (layer, position).
- ``contrastive``: the same harmful prompts answered with a refusing vs a complying prefix;
  mean(refusing) - mean(complying) at the last token, one candidate per layer.

Candidates pass the reference filters (:func:`reference_scores`, :func:`reference_filter`) and are
then judged by what the steered model *generates* (:func:`coeff_search`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from safesteer.core import judge as judge_mod
from safesteer.core.probe import HarmProbe
from safesteer.errors import SafeSteerError
from safesteer.models import decoder_layers

METHODS = ("diff_in_means", "contrastive")

# Opening words of typical refusals; their first tokens define p(R) in the refusal score.
REFUSAL_STARTS = ("I", "Sorry", "As", "Unfortunately", "I'm", "I cannot", "I apologize", "My apologies")

REFUSING_PREFIXES = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "Sorry, I can't provide that.",
    "I'm unable to help with that request.",
)
COMPLYING_PREFIXES = (
    "Sure, here is",
    "Of course! Here's how",
    "Certainly, here are the steps:",
    "Here is a detailed guide:",
)


# ----------------------------------------------------------------------------------------- vectors
@dataclass
class SteeringVector:
    """A refusal direction with where and how strongly to add it. ``vector`` is (D,) float32.
    ``probe`` is the harm probe of a harm-gated teacher (saved in the same file), if any."""

    vector: torch.Tensor
    layer: int
    coeff: float
    method: str
    position: int = -1
    model: str = ""
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    probe: HarmProbe | None = None

    def meta(self) -> dict[str, str]:
        d = {k: v for k, v in asdict(self).items() if k not in ("vector", "probe")}
        if self.probe is not None:
            d["probe"] = {
                "layer": self.probe.layer,
                "threshold": self.probe.threshold,
                "metrics": self.probe.metrics,
            }
        return {k: json.dumps(v) for k, v in d.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"vector": self.vector.detach().float().contiguous().cpu()}
        if self.probe is not None:
            out["probe_direction"] = self.probe.direction.detach().float().contiguous().cpu()
        return out


def _parse_vector(blob: bytes, where: str) -> SteeringVector:
    """A SteeringVector from safetensors bytes; anything else (a pickle, say) is refused unread."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        tensors = load(blob)
        vec = tensors["vector"]
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SafeSteerError(
            f"{where}: not a SafeSteer safetensors vector ({' '.join(str(e).split())[:200]})"
        ) from e
    try:
        fields = {k: json.loads(v) for k, v in meta.items()}
        probe = fields.pop("probe", None)
        if probe is not None:
            probe = HarmProbe(direction=tensors["probe_direction"].float(), **probe)
        sv = SteeringVector(vector=vec.float(), probe=probe, **fields)
    except (TypeError, ValueError, KeyError) as e:
        raise SafeSteerError(f"{where}: bad steering-vector metadata ({e})") from e
    if vec.dim() != 1:
        raise SafeSteerError(f"{where}: steering vector must be 1-D, got shape {tuple(vec.shape)}")
    return sv


def vector_bytes(sv: SteeringVector) -> bytes:
    """The safetensors serialisation of ``sv`` (vector + metadata)."""
    from safetensors.torch import save

    return save(sv.tensors(), metadata=sv.meta())


def load_vector_bytes(blob: bytes) -> SteeringVector:
    return _parse_vector(blob, "steering vector")


def save_vector(sv: SteeringVector, path: str | Path) -> None:
    """Write the vector as safetensors with its metadata (atomically)."""
    from safesteer.paths import atomic_write_bytes

    atomic_write_bytes(Path(path), vector_bytes(sv))


def load_vector(
    path: str | Path, hidden_size: int | None = None, num_layers: int | None = None
) -> SteeringVector:
    """Read a vector written by :func:`save_vector` and check it fits the model; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise SafeSteerError(f"{path}: steering vector file not found")
    sv = _parse_vector(path.read_bytes(), str(path))
    if hidden_size is not None and sv.vector.numel() != hidden_size:
        raise SafeSteerError(
            f"{path}: steering vector has width {sv.vector.numel()} but the model's hidden size is {hidden_size}"
        )
    if num_layers is not None and not 0 <= sv.layer < num_layers:
        raise SafeSteerError(
            f"{path}: steering layer {sv.layer} is out of range for a {num_layers}-layer model"
        )
    return sv


# ----------------------------------------------------------------------------------------- teacher
SAFETY_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. If a request is harmful, dangerous, illegal or unethical, "
    "refuse it briefly and politely. Otherwise, help as well as you can."
)
TEACHER_KINDS = ("vector", "system_prompt")


@dataclass
class Teacher:
    """The frozen safety teacher: the student's initial weights plus a steering vector
    (``kind="vector"``) or plus a safety system prompt (``kind="system_prompt"``)."""

    kind: str = "vector"
    vector: SteeringVector | None = None
    system_prompt: str = SAFETY_SYSTEM_PROMPT
    # The coefficient of the vector on anchor prompts (``steer=False``): 0 is the original model; a
    # negative one steers the anchors' teacher away from refusal (kind=vector; a system-prompt teacher
    # has no vector and scores anchors with the original model whatever this is).
    anchor_coeff: float = 0.0
    # The coefficient on steered prompts (None: the vector's own, chosen by the steering search).
    coeff: float | None = None
    # Where the vector is added: "all" positions (the reference) or the "prompt" only (see steering()).
    positions: str = "all"

    def __post_init__(self):
        if self.kind not in TEACHER_KINDS:
            raise SafeSteerError(f"teacher.kind={self.kind}: choose one of {', '.join(TEACHER_KINDS)}")
        if self.kind == "vector" and self.vector is None:
            raise SafeSteerError("teacher.kind=vector needs a steering vector")

    def apply(
        self, model, steer: bool = True, mask: torch.Tensor | None = None
    ) -> contextlib.AbstractContextManager:
        """The context in which ``model`` behaves as the teacher (the steering hook, or nothing).

        ``steer=False`` gives the teacher of anchor prompts (conditional steering): the original model,
        or the vector at ``anchor_coeff`` when that is non-zero. ``mask`` (B, T) marks the prompt
        positions of a forward pass over prompt + completion (see :func:`steering`).
        """
        if self.kind == "vector" and (steer or self.anchor_coeff):
            v = self.vector
            return steering(model, v.layer, v.vector, self.coefficient(steer), self.positions, mask)
        return contextlib.nullcontext()

    def coefficient(self, steer: bool = True) -> float:
        """The vector's coefficient on steered prompts (``steer``) or on the others."""
        if not steer:
            return self.anchor_coeff
        return self.coeff if self.coeff is not None else self.vector.coeff

    def prompt_texts(self, tok, instructions: Sequence[str], steer: bool = True) -> list[str]:
        """The teacher's chat-formatted prompts (with the safety system prompt for that kind)."""
        system = self.system_prompt if self.kind == "system_prompt" and steer else None
        return chat_texts(tok, instructions, system)


# ------------------------------------------------------------------------------------------- hooks
def _check_layer(model, layer: int) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SafeSteerError(f"steering layer {layer} is out of range: the model has {len(layers)} layers")
    return layers[layer]


def _edit_hidden(fn):
    """A forward pre-hook that rewrites the block input, whether passed positionally or by keyword."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


POSITIONS = ("prompt", "all")


@contextlib.contextmanager
def steering(
    model,
    layer: int,
    vector: torch.Tensor,
    coeff: float = 1.0,
    positions: str = "all",
    mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Add ``coeff * vector`` to the input of decoder block ``layer``.

    ``positions="all"`` (the reference): at every position, prompt and completion alike.
    ``positions="prompt"``: at the prompt's positions only; the completion sees the steered prompt
    through attention. In a forward pass over prompt + completion, ``mask`` (B, T) marks the prompt
    positions; without a mask, a pass over more than one position is a prefill (all prompt) and a
    one-position pass is a decoding step (not steered), as in ``generate`` with a KV cache.
    Works under ``torch.no_grad`` and autograd, with any padding; removed on exit.
    """
    if positions not in POSITIONS:
        raise SafeSteerError(f"teacher.positions={positions}: choose one of {', '.join(POSITIONS)}")
    block = _check_layer(model, layer)
    hidden = model.config.get_text_config().hidden_size
    if vector.numel() != hidden:
        raise SafeSteerError(
            f"steering vector has width {vector.numel()} but the model's hidden size is {hidden}"
        )

    def add(h: torch.Tensor) -> torch.Tensor:
        v = (coeff * vector).to(device=h.device, dtype=h.dtype)
        if positions == "all":
            return h + v
        if mask is not None:
            if mask.shape != h.shape[:2]:
                raise ValueError(
                    f"steering mask {tuple(mask.shape)} does not match the batch {tuple(h.shape[:2])}"
                )
            return h + mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1) * v
        return h + v if h.shape[1] > 1 else h

    handle = block.register_forward_pre_hook(_edit_hidden(add), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def prompt_mask(prompt_lens: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) float: 1 at each right-padded row's first ``prompt_lens[b]`` positions."""
    return (torch.arange(length).unsqueeze(0) < prompt_lens.view(-1, 1)).float()


@contextlib.contextmanager
def ablation(model, direction: torch.Tensor) -> Iterator[None]:
    """Project the unit ``direction`` out of the residual stream at every block input and at the final norm."""
    u = direction.float() / direction.float().norm().clamp(min=1e-12)

    def project(h: torch.Tensor) -> torch.Tensor:
        uu = u.to(device=h.device, dtype=h.dtype)
        return h - (h @ uu).unsqueeze(-1) * uu

    modules = [*decoder_layers(model)]
    norm = getattr(model.model, "norm", None)
    if norm is not None:
        modules.append(norm)
    handles = [m.register_forward_pre_hook(_edit_hidden(project), with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------- prompts
def chat_texts(tok, instructions: Sequence[str], system: str | None = None) -> list[str]:
    """Instructions formatted with the chat template, ending at the assistant's turn."""
    out = []
    for ins in instructions:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": ins}
        ]
        out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def post_instruction_tokens(tok) -> list[int]:
    """Token ids the chat template puts after the user's text (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)."""
    marker = "XQZJ"
    text = chat_texts(tok, [marker])[0]
    suffix = text[text.rindex(marker) + len(marker) :]
    return tok(suffix, add_special_tokens=False)["input_ids"]


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _encode(tok, texts: Sequence[str], device) -> dict:
    tok.padding_side = "left"
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return enc


@torch.no_grad()
def mean_block_inputs(
    model, tok, texts: Sequence[str], n_positions: int, batch_size: int = 16
) -> torch.Tensor:
    """Mean block input over ``texts`` at their last ``n_positions`` tokens: (L, n_positions, D) float32."""
    total = None
    for chunk in _batches(texts, batch_size):
        enc = _encode(tok, chunk, model.device)
        hs = model(
            **enc, output_hidden_states=True
        ).hidden_states  # L+1 tensors (B,T,D); hs[l] = input of block l
        acts = torch.stack([h[:, -n_positions:, :].float() for h in hs[:-1]], dim=1)  # (B,L,P,D)
        s = acts.sum(0)
        total = s if total is None else total + s
    return total / len(texts)


def diff_in_means_candidates(
    model, tok, harmful: Sequence[str], harmless: Sequence[str], batch_size: int = 16
):
    """Reference candidates r[l, pos] = mean(harmful) - mean(harmless) at post-instruction positions.

    Returns (L, P, D) float32 with P = number of post-instruction tokens (position -P .. -1).
    """
    n_pos = len(post_instruction_tokens(tok))
    h = mean_block_inputs(model, tok, chat_texts(tok, harmful), n_pos, batch_size)
    b = mean_block_inputs(model, tok, chat_texts(tok, harmless), n_pos, batch_size)
    return h - b


def contrastive_candidates(model, tok, harmful: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """mean(refusing answer prefix) - mean(complying answer prefix) at the last token: (L, 1, D)."""
    prompts = chat_texts(tok, harmful)
    refuse = [p + REFUSING_PREFIXES[i % len(REFUSING_PREFIXES)] for i, p in enumerate(prompts)]
    comply = [p + COMPLYING_PREFIXES[i % len(COMPLYING_PREFIXES)] for i, p in enumerate(prompts)]
    return mean_block_inputs(model, tok, refuse, 1, batch_size) - mean_block_inputs(
        model, tok, comply, 1, batch_size
    )


# ----------------------------------------------------------------------------------------- scores
def refusal_token_ids(tok) -> list[int]:
    """First tokens of typical refusals under this tokenizer (with and without a leading space)."""
    ids = set()
    for w in REFUSAL_STARTS:
        for text in (w, " " + w):
            toks = tok(text, add_special_tokens=False)["input_ids"]
            if toks:
                ids.add(toks[0])
    return sorted(ids)


@torch.no_grad()
def last_logprobs(model, tok, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Log-softmax of the next-token logits after each text: (N, V) float32."""
    out = []
    for chunk in _batches(texts, batch_size):
        enc = _encode(tok, chunk, model.device)
        logits = model(**enc).logits[:, -1, :].float()
        out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def refusal_score_from_logprobs(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log p(R) - log(1 - p(R)) with p(R) the total probability of the refusal ids: (N,V) -> (N,)."""
    log_p = torch.logsumexp(logprobs[:, list(refusal_ids)], dim=-1)
    return log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))


def refusal_score(model, tok, instructions: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 16):
    """Refusal score at the last prompt position for each instruction: (N,)."""
    return refusal_score_from_logprobs(
        last_logprobs(model, tok, chat_texts(tok, instructions), batch_size), refusal_ids
    )


@dataclass
class CandidateScore:
    layer: int
    position: int
    ablation_refusal: float  # mean refusal score on harmful val with the direction ablated (lower is better)
    steering_score: float  # mean refusal score on harmless val with the vector added (must be >= 0)
    ablation_kl: float  # mean KL(base || ablated) of the next token on harmless val (must be <= max_kl)


def reference_scores(
    model,
    tok,
    candidates: torch.Tensor,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress=None,
) -> list[CandidateScore]:
    """The reference selection scores for every candidate (L,P,D) at ``layers`` (all if None)."""
    rid = refusal_token_ids(tok)
    harmful_t, harmless_t = chat_texts(tok, harmful_val), chat_texts(tok, harmless_val)
    base_harmless = last_logprobs(model, tok, harmless_t, batch_size)
    L, P, _ = candidates.shape
    out = []
    for layer in layers if layers is not None else range(L):
        for p in range(P):
            r = candidates[layer, p]
            with ablation(model, r):
                abl_refusal = refusal_score_from_logprobs(
                    last_logprobs(model, tok, harmful_t, batch_size), rid
                )
                abl_harmless = last_logprobs(model, tok, harmless_t, batch_size)
            kl = (base_harmless.exp() * (base_harmless - abl_harmless)).sum(-1)
            with steering(model, layer, r, 1.0):
                steer = refusal_score_from_logprobs(last_logprobs(model, tok, harmless_t, batch_size), rid)
            out.append(
                CandidateScore(layer, p - P, abl_refusal.mean().item(), steer.mean().item(), kl.mean().item())
            )
            if progress is not None:
                progress.update(1)
    return out


def allowed_layers(num_layers: int, prune_fraction: float = 0.2) -> list[int]:
    """Layers outside the last ``prune_fraction`` of depth (the reference drops the last 20%)."""
    return list(range(int(num_layers * (1 - prune_fraction))))


def reference_filter(
    scores: Sequence[CandidateScore], max_kl: float | None = 0.1, min_steering_score: float | None = 0.0
) -> list[CandidateScore]:
    """Drop ablation KL > ``max_kl`` and steering score < ``min_steering_score`` (reference: 0.1 and 0;
    None disables a filter); sort by ablated refusal score, lowest first."""
    kept = [
        s
        for s in scores
        if (max_kl is None or s.ablation_kl <= max_kl)
        and (min_steering_score is None or s.steering_score >= min_steering_score)
        and math.isfinite(s.ablation_refusal)
    ]
    return sorted(kept, key=lambda s: s.ablation_refusal)


# ------------------------------------------------------------------------------------- generation
def stop_token_ids(model, tok) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS plus the model's generation-config EOS ids."""
    cfg = model.generation_config.eos_token_id
    ids = set(cfg if isinstance(cfg, list) else [] if cfg is None else [cfg])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


@torch.no_grad()
def generate(
    model,
    tok,
    texts: Sequence[str],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 16,
) -> list[list[int]]:
    """HF generation from chat-formatted texts; returns the new token ids (EOS and padding stripped)."""
    eos = stop_token_ids(model, tok)
    out: list[list[int]] = []
    for chunk in _batches(texts, batch_size):
        enc = _encode(tok, chunk, model.device)
        enc.pop("position_ids")  # generate derives them from the attention mask
        kw = (
            dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if do_sample
            else dict(do_sample=False)
        )
        seqs = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tok.pad_token_id,
            **kw,
        )[:, enc["input_ids"].shape[1] :]
        for row in seqs.tolist():
            ids = []
            for t in row:
                if t in eos:
                    break
                ids.append(t)
            out.append(ids)
    return out


def generate_texts(
    model, tok, instructions: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    ids = generate(model, tok, chat_texts(tok, instructions), max_new_tokens, batch_size=batch_size)
    return [tok.decode(x, skip_special_tokens=True) for x in ids]


@dataclass
class SteeringTrial:
    """What one (layer, position, coeff) does: greedy answers judged, and the refusal log-odds."""

    layer: int
    position: int
    coeff: float
    harmful_refusal: float  # judged refusals among greedy answers to harmful validation prompts
    benign_refusal: float  # the same on harmless validation prompts
    degenerate: float  # degenerate answers over both sets
    norm: float  # ||coeff * r||
    harmful_score: float = 0.0  # mean refusal score (log-odds of refusal first tokens) on harmful prompts
    benign_score: float = 0.0  # the same on harmless prompts


def coeff_search(
    model,
    tok,
    candidates: Sequence[tuple[int, int, torch.Tensor]],
    coeffs: Sequence[float],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress=None,
) -> list[SteeringTrial]:
    """Steer with each (layer, position, vector) x coeff: generate greedily, judge, and score."""
    rid = refusal_token_ids(tok)
    trials = []
    for layer, pos, vec in candidates:
        for c in coeffs:
            with steering(model, layer, vec, c):
                harm = generate_texts(model, tok, harmful_val, max_new_tokens, batch_size)
                ben = generate_texts(model, tok, harmless_val, max_new_tokens, batch_size)
                hs = refusal_score(model, tok, harmful_val, rid, batch_size).mean().item()
                bs = refusal_score(model, tok, harmless_val, rid, batch_size).mean().item()
            rh, rb = judge_mod.rates(harm), judge_mod.rates(ben)
            deg = (rh["degenerate"] * rh["n"] + rb["degenerate"] * rb["n"]) / (rh["n"] + rb["n"])
            trials.append(
                SteeringTrial(layer, pos, c, rh["refusal"], rb["refusal"], deg, float(vec.norm() * c), hs, bs)
            )
            if progress is not None:
                progress.update(1)
    return trials


def best_trial(
    trials: Sequence[SteeringTrial], max_degenerate: float = 0.05, max_benign_refusal: float = 1.0
) -> SteeringTrial:
    """The strongest coherent, selective teacher.

    Among trials with at most ``max_degenerate`` degenerate answers and at most
    ``max_benign_refusal`` refusals of harmless prompts, take the highest refusal score on harmful
    prompts: the student is distilled toward the teacher's *distribution*, and two teachers with
    the same greedy refusal rate can differ a lot there (measured on the default model: layer 13 and
    layer 14 at coeff 0.5 both refuse 81% greedily; layer 14's log-odds are 0.5 higher, and only its
    student learned to refuse). Ties go to the smaller coefficient. Raises when no trial qualifies:
    a teacher that produces garbage must never be chosen.
    """
    coherent = [t for t in trials if t.degenerate <= max_degenerate]
    if not coherent:
        best = min(trials, key=lambda t: t.degenerate)
        raise SafeSteerError(
            f"every steering candidate makes the model degenerate (best {best.degenerate:.0%} > "
            f"steering.max_degenerate={max_degenerate:.0%}); try smaller steering.coeffs or other layers"
        )
    ok = [t for t in coherent if t.benign_refusal <= max_benign_refusal]
    if not ok:
        best = min(coherent, key=lambda t: t.benign_refusal)
        raise SafeSteerError(
            f"every coherent steering candidate refuses too many harmless prompts (best {best.benign_refusal:.0%} > "
            f"steering.max_benign_refusal={max_benign_refusal:.0%}); try smaller steering.coeffs"
        )
    return max(ok, key=lambda t: (round(t.harmful_score, 6), -t.coeff))
