"""Finding the refusal direction: candidate steering vectors and the searches that pick one.

Two ways to find the steering vector r (see :mod:`safesteer.core.steering` for how it is added):

- ``diff_in_means`` (reference): mean(harmful) - mean(harmless) of the block inputs at each
  post-instruction chat-template position, one candidate per (layer, position).
- ``contrastive``: the same harmful prompts answered with a refusing vs a complying prefix;
  mean(refusing) - mean(complying) at the last token, one candidate per layer.

Candidates pass the reference filters (:func:`reference_scores`, :func:`reference_filter`) and are
then judged by what the steered model *generates* (:func:`coeff_search`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safesteer.core import judge as judge_mod
from safesteer.core.generation import batches, chat_texts, encode, generate_texts, post_instruction_tokens
from safesteer.core.steering import ablation, steering
from safesteer.errors import SafeSteerError

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


# ------------------------------------------------------------------------------------- candidates
@torch.no_grad()
def mean_block_inputs(
    model, tok, texts: Sequence[str], n_positions: int, batch_size: int = 16, bar=None
) -> torch.Tensor:
    """Mean block input over ``texts`` at their last ``n_positions`` tokens: (L, n_positions, D) float32.
    ``bar`` (a progress bar, optional) advances by one per text."""
    total = None
    for chunk in batches(texts, batch_size):
        if bar is not None:
            bar.update(len(chunk))
        enc = encode(tok, chunk, model.device)
        hs = model(
            **enc, output_hidden_states=True
        ).hidden_states  # L+1 tensors (B,T,D); hs[l] = input of block l
        acts = torch.stack([h[:, -n_positions:, :].float() for h in hs[:-1]], dim=1)  # (B,L,P,D)
        s = acts.sum(0)
        total = s if total is None else total + s
    return total / len(texts)


def diff_in_means_candidates(
    model, tok, harmful: Sequence[str], harmless: Sequence[str], batch_size: int = 16, bar=None
):
    """Reference candidates r[l, pos] = mean(harmful) - mean(harmless) at post-instruction positions.

    Returns (L, P, D) float32 with P = number of post-instruction tokens (position -P .. -1).
    """
    n_pos = len(post_instruction_tokens(tok))
    h = mean_block_inputs(model, tok, chat_texts(tok, harmful), n_pos, batch_size, bar)
    b = mean_block_inputs(model, tok, chat_texts(tok, harmless), n_pos, batch_size, bar)
    return h - b


def contrastive_candidates(
    model, tok, harmful: Sequence[str], batch_size: int = 16, bar=None
) -> torch.Tensor:
    """mean(refusing answer prefix) - mean(complying answer prefix) at the last token: (L, 1, D)."""
    prompts = chat_texts(tok, harmful)
    refuse = [p + REFUSING_PREFIXES[i % len(REFUSING_PREFIXES)] for i, p in enumerate(prompts)]
    comply = [p + COMPLYING_PREFIXES[i % len(COMPLYING_PREFIXES)] for i, p in enumerate(prompts)]
    return mean_block_inputs(model, tok, refuse, 1, batch_size, bar) - mean_block_inputs(
        model, tok, comply, 1, batch_size, bar
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
    for chunk in batches(texts, batch_size):
        enc = encode(tok, chunk, model.device)
        logits = model(**enc, logits_to_keep=1).logits[:, -1, :].float()
        out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def refusal_score_from_logprobs(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log p(R) - log(1 - p(R)) with p(R) the total probability of the refusal ids: (N,V) -> (N,)."""
    log_p = torch.logsumexp(logprobs[:, list(refusal_ids)], dim=-1)
    return log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))


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
    """The reference selection scores for every candidate (L,P,D) at ``layers`` (all if None).

    A zero candidate (up to rounding) is skipped: it cannot steer, and the reference scores cannot rank it (its
    ablation and addition change nothing). Difference-in-means candidates at block 0 are zero at the
    chat template's own tokens, whose embeddings are the same for every prompt.
    """
    rid = refusal_token_ids(tok)
    harmful_t, harmless_t = chat_texts(tok, harmful_val), chat_texts(tok, harmless_val)
    base_harmless = last_logprobs(model, tok, harmless_t, batch_size)
    L, P, _ = candidates.shape
    tiny = 1e-6 * float(candidates.norm(dim=-1).max())
    out = []
    for layer in layers if layers is not None else range(L):
        for p in range(P):
            r = candidates[layer, p]
            if float(r.norm()) <= tiny:
                if progress is not None:
                    progress.update(1)
                continue
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


def depth_layers(num_layers: int, depth: Sequence[float] = (0.0, 0.8)) -> list[int]:
    """The layers ``l`` (0-based) with ``ceil(lo * L) <= l < floor(hi * L)`` for ``depth = (lo, hi)``,
    ``L = num_layers``: the layers whose whole slice ``[l / L, (l + 1) / L]`` of depth lies within
    ``[lo, hi]`` (a product within 1e-9 of an integer counts as that integer). One setting serves any
    depth: (0.4, 0.55) gives layers 12-15 of 30 (not 16: its slice ends at 17/30 > 0.55) and 15-18 of
    36. The reference, (0, 0.8), keeps the layers within the first 80% of depth (0-23 of 30, 0-21 of 28)."""
    lo, hi = depth
    return list(range(math.ceil(lo * num_layers - 1e-9), math.floor(hi * num_layers + 1e-9)))


COEFF_UNITS = ("vector", "residual")


def absolute_coeffs(
    coeffs: Sequence[float], unit: str, vector: torch.Tensor, residual_norm: float | None = None
) -> list[float]:
    """The multipliers of ``vector`` that ``coeffs`` mean: as given (``vector``: ``c * r``), or as
    fractions of the residual stream's norm at the vector's layer (``residual``: the added vector has
    norm ``c * residual_norm``), so that one setting means the same push on any model."""
    if unit == "vector":
        return [float(c) for c in coeffs]
    if unit == "residual":
        scale = float(residual_norm) / float(vector.norm())
        return [float(c) * scale for c in coeffs]
    raise SafeSteerError(f"steering.coeff_unit={unit}: choose one of {', '.join(COEFF_UNITS)}")


@torch.no_grad()
def residual_norms(model, tok, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Mean norm of each block's input (the residual stream) at the last token of ``texts``: (L,)."""
    total = None
    for chunk in batches(texts, batch_size):
        hs = model(**encode(tok, chunk, model.device), output_hidden_states=True).hidden_states
        norms = torch.stack([h[:, -1, :].float().norm(dim=-1) for h in hs[:-1]], dim=1).sum(0)  # (L,)
        total = norms if total is None else total + norms
    return (total / len(texts)).cpu()


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


# ----------------------------------------------------------------------------------------- search
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
            with steering(model, layer, vec, c):  # the refusal scores come from generation's prefill
                harm_lp: list[torch.Tensor] = []
                ben_lp: list[torch.Tensor] = []
                harm = generate_texts(model, tok, harmful_val, max_new_tokens, batch_size, harm_lp)
                ben = generate_texts(model, tok, harmless_val, max_new_tokens, batch_size, ben_lp)
            hs = refusal_score_from_logprobs(torch.cat(harm_lp), rid).mean().item()
            bs = refusal_score_from_logprobs(torch.cat(ben_lp), rid).mean().item()
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
