"""LoRA adapters folded into the base weights: what the rollout engines load and the export writes.

With ``learner.lora.r > 0`` the learners train low-rank adapters (peft) on the student's linear
layers: a layer's weight is ``W + scaling * B @ A``, ``scaling = alpha / r``. peft keeps ``W`` at
``<layer>.base_layer.weight`` and the factors at ``<layer>.lora_A.<adapter>.weight`` and
``<layer>.lora_B.<adapter>.weight``; :func:`merged_state` turns such a state dict back into the
model's own names and weights, without touching the modules.
"""

from __future__ import annotations

import torch

BASE = ".base_layer."


def merged_state(state: dict[str, torch.Tensor], scaling: float, adapter: str = "default") -> dict:
    """The plain state dict of a model with LoRA layers: every ``base_layer`` weight plus its
    adapter's ``scaling * B @ A`` (computed in float32), under the layer's own name; the factors dropped."""
    out = {}
    for name, value in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if BASE not in name:
            out[name] = value
            continue
        plain = name.replace(BASE, ".")
        prefix, _, kind = name.rpartition(BASE)
        a = state.get(f"{prefix}.lora_A.{adapter}.weight")
        if kind == "weight" and a is not None:
            b = state[f"{prefix}.lora_B.{adapter}.weight"]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        out[plain] = value
    return out
