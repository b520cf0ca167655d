"""Steering vectors, the residual-stream hook, and the steered teacher.

A *steering vector* r is added, scaled by ``coeff``, to the residual stream at the input of decoder
block ``layer``, at every position (prompt and completion alike; :func:`steering`). Vectors are saved
as safetensors with their metadata (:func:`vector_bytes`, :func:`load_vector`), never pickled. The
:class:`Teacher` is the frozen safety teacher: the model plus a vector, or plus a safety system prompt.

How r is found and chosen: :mod:`safesteer.core.search`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from safesteer.core.blobs import header
from safesteer.core.generation import chat_texts
from safesteer.core.probe import HarmProbe
from safesteer.errors import SafeSteerError


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
    try:
        meta = header(blob).get("__metadata__") or {}
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
    return save(sv.tensors(), metadata=sv.meta())


def load_vector_bytes(blob: bytes) -> SteeringVector:
    return _parse_vector(blob, "steering vector")


def load_vector(
    path: str | Path, hidden_size: int | None = None, num_layers: int | None = None
) -> SteeringVector:
    """Read a vector written by :func:`vector_bytes` and check it fits the model; never unpickles."""
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
SUPPORTED_LAYER_PATH = "model.model.layers"


def decoder_layers(model):
    """The decoder blocks of an HF (or vLLM) causal LM (``model.model.layers``), or a clear error."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers, "__len__") or len(layers) == 0:
        arch = type(model).__name__
        raise SafeSteerError(
            f"unsupported model architecture {arch}: SafeSteer steers decoder blocks at "
            f"{SUPPORTED_LAYER_PATH} (Llama, Qwen2/3, Mistral, Gemma families)"
        )
    return layers


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
