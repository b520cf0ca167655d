"""The harm probe: is a prompt harmful? Read off the model's own activations, before it answers.

A difference-in-means direction at the last prompt token (the input of decoder block ``layer``),
harmful minus harmless prompts, scored by projection:

    score(x) = <h_layer(x)[-1], u>,   u = (mean_harmful - mean_harmless) / ||.||

A prompt is flagged harmful when ``score > threshold``; the threshold maximises balanced accuracy
on held-aside validation prompts. The harm-gated teacher (``teacher.gate=probe``) steers toward
refusal only the prompts the probe flags, so the rollout stream may mix harmful and benign prompts
with no labels at training time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class HarmProbe:
    """``direction`` (D,) float32, unit norm; ``threshold`` on the projection at block ``layer``'s input."""

    direction: torch.Tensor
    layer: int
    threshold: float
    metrics: dict = field(default_factory=dict)

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """(N, D) last-token states at ``layer`` -> (N,) projections."""
        return states.float() @ self.direction.to(states.device)

    def flags(self, states: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) bool: flagged harmful."""
        return self.scores(states) > self.threshold


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Unit direction mean(harmful) - mean(harmless); both (N, D)."""
    d = harmful.float().mean(0) - harmless.float().mean(0)
    return d / d.norm().clamp(min=1e-12)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    p, n = positive.float().view(-1, 1), negative.float().view(1, -1)
    return float((p > n).float().mean() + 0.5 * (p == n).float().mean())


def balanced_threshold(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, float]:
    """The threshold (a midpoint between adjacent scores) maximising (TPR + TNR) / 2, and that value."""
    scores = torch.cat([positive, negative]).float().sort().values
    cands = torch.cat([scores[:1] - 1, (scores[1:] + scores[:-1]) / 2, scores[-1:] + 1])
    tpr = (positive.float().view(1, -1) > cands.view(-1, 1)).float().mean(1)
    tnr = (negative.float().view(1, -1) <= cands.view(-1, 1)).float().mean(1)
    bal = (tpr + tnr) / 2
    i = int(bal.argmax())
    return float(cands[i]), float(bal[i])


def fit(
    layer_states: dict[int, tuple[torch.Tensor, torch.Tensor]],
    val_states: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[HarmProbe, dict[int, dict]]:
    """A probe per layer from (harmful, harmless) states; the layer with the highest validation AUROC
    wins (ties: the earlier layer). Returns the probe and every layer's validation metrics."""
    report: dict[int, dict] = {}
    best: HarmProbe | None = None
    for layer in sorted(layer_states):
        h, b = layer_states[layer]
        u = mean_difference(h, b)
        vh, vb = val_states[layer]
        sh, sb = vh.float() @ u, vb.float() @ u
        threshold, balanced = balanced_threshold(sh, sb)
        m = {
            "auroc": auroc(sh, sb),
            "balanced_accuracy": balanced,
            "tpr": float((sh > threshold).float().mean()),
            "fpr": float((sb > threshold).float().mean()),
            "n_val": [len(sh), len(sb)],
        }
        report[layer] = m
        if best is None or m["auroc"] > best.metrics["auroc"]:
            best = HarmProbe(u, layer, threshold, m)
    assert best is not None, "no layer"
    return best, report


@torch.no_grad()
def last_token_states(
    model, input_ids: Sequence[Sequence[int]], layers: Sequence[int], batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Block inputs at the last token of each prompt: {layer: (N, D) float32}. Prompts are token ids
    (chat-formatted); the batch is left-padded so the last token sits at position -1."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for s in range(0, len(input_ids), batch_size):
        chunk = input_ids[s : s + batch_size]
        T = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, T - len(x) :] = torch.tensor(list(x), dtype=torch.long)
            mask[i, T - len(x) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = model.device
        hs = model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            output_hidden_states=True,
        ).hidden_states  # hs[l] = input of block l
        for layer in layers:
            out[layer].append(hs[layer][:, -1, :].float().cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}
