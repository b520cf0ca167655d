"""LoRA adapters folded into the base weights: what the rollout engines load and the export writes.

With ``learner.lora.r > 0`` the learners train low-rank adapters (peft) on the student's linear
layers: a layer's weight is ``W + scaling * B @ A``, ``scaling = alpha / r``. peft keeps the factors
at ``<layer>.lora_A.<adapter>.weight`` and ``<layer>.lora_B.<adapter>.weight``.

What crosses the object store is the factors only (megabytes, not a model copy): a *factor blob*,
safetensors with ``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` under the model's own layer
names and the scaling in its metadata. The receiver adds ``scaling * B @ A`` to the base weights it
reads one tensor at a time from the checkpoint on disk (:func:`merged_weights`), so neither side
holds a second copy of the model.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save

from safesteer.core.blobs import header

FORMAT = "safesteer-lora-factors"
A, B = ".lora_A.weight", ".lora_B.weight"


def factor_blob(state: dict[str, torch.Tensor], scaling: float, adapter: str = "default") -> bytes:
    """The adapter's factors out of a peft-injected state dict, as a factor blob."""
    out = {}
    for name, value in state.items():
        for kind, suffix in (("lora_A", A), ("lora_B", B)):
            tag = f".{kind}.{adapter}.weight"
            if name.endswith(tag):
                out[name[: -len(tag)] + suffix] = value.detach().float().cpu().contiguous()
    return save(out, metadata={"format": FORMAT, "scaling": repr(float(scaling))})


def _metadata(blob: bytes) -> dict:
    return header(blob).get("__metadata__") or {}


def is_factor_blob(blob: bytes) -> bool:
    """Whether a blob is a factor blob (else: plain weights, or not safetensors at all)."""
    try:
        return _metadata(blob).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def load_factors(blob: bytes) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``{layer: (A, B)}`` and the scaling of a factor blob."""
    tensors = load(blob)
    layers = {n[: -len(A)]: (tensors[n], tensors[n[: -len(A)] + B]) for n in tensors if n.endswith(A)}
    return layers, float(_metadata(blob)["scaling"])


def merged_weights(blob: bytes, read_base, dtype: torch.dtype | None = None):
    """``(name, W + scaling * B @ A)`` for every adapted layer of a factor blob, one at a time:
    ``read_base(name)`` gives the base weight (e.g. :func:`safesteer.models.checkpoint_reader`); the
    sum is computed in float32 and cast to ``dtype`` (None: the base weight's)."""
    layers, scaling = load_factors(blob)
    for layer, (a, b) in layers.items():
        name = f"{layer}.weight"
        base = read_base(name)
        merged = base.float() + scaling * (b @ a)
        yield name, merged.to(dtype or base.dtype)


def peft_adapter(blob: bytes) -> bytes:
    """A factor blob as peft's ``adapter_model.safetensors`` (keys under ``base_model.model.``)."""
    return save({f"base_model.model.{k}": v for k, v in load(blob).items()})
