"""Safety tokens: a small global set of vocabulary ids where the steered and unsteered models differ.

On harmless prompts, the steered model samples S continuations of H-1 tokens; both models are then
teacher-forced over the last H positions and Δ = log p_steered - log p_base (full vocabulary).
Positions after the unsteered model's argmax reaches an end-of-turn token, and positions inside a
reasoning block (``<think>...</think>``), are masked; special tokens, the reasoning markers, tokens
containing ``<|`` and tokens whose mean steered probability is below ``min_steered_prob`` are banned. Ranking (``method``):

- ``vote`` (reference): each valid (sample, position) votes for its top-``vote_top`` Δ tokens; keep
  the top K by votes, dropping zero-vote ones.
- ``mean``: top K by mean Δ over valid positions.
- ``kl``: top K by each token's contribution to KL(steered || base), the mean of p_steered(v)·Δ(v).
  At small scale ``vote``/``mean`` pick rare tokens the student never emits; ``kl`` picks the
  refusal tokens that carry the steered model's mass.
- ``contrast``: the ``kl`` contribution measured on *harmful* prompts, minus ``contrast_weight``
  times the original model's mean probability of the token on the harmless prompts: refusal words
  rank high, the openings of every answer ('I', ',', 'You') low.

The student's mass on the chosen set is always measured: a set it never emits would make the
localized loss vanish, so such a set is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safesteer.core.generation import (
    chat_texts,
    generate,
    reasoning_ids,
    reasoning_length,
    stop_token_ids,
)
from safesteer.core.steering import Teacher
from safesteer.errors import SafeSteerError

TOKEN_METHODS = ("vote", "mean", "kl", "contrast")


@dataclass
class SafetyTokens:
    """The chosen set: ids with their scores and mean base/steered probabilities."""

    ids: list[int]
    strings: list[str]
    scores: list[float]
    p_base: list[float]
    p_steered: list[float]
    method: str
    student_mass: float  # mean over valid positions of the unsteered model's mass on the set
    steered_mass: float  # the same for the steered model
    meta: dict = field(default_factory=dict)

    def content_hash(self) -> str:
        """sha256 of the ids and their strings, in order: the K order the teacher's log-probs and the
        learners' loss index by. The driver, the teachers and the learners must agree on it."""
        blob = json.dumps({"ids": list(self.ids), "strings": list(self.strings)}, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> SafetyTokens:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            st = cls(**d)
        except FileNotFoundError as e:
            raise SafeSteerError(f"{path}: safety-token file not found") from e
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise SafeSteerError(
                f"{path}: not a SafeSteer safety-token JSON ({' '.join(str(e).split())})"
            ) from e
        if not st.ids or not all(isinstance(i, int) and i >= 0 for i in st.ids):
            raise SafeSteerError(
                f"{path}: safety-token ids must be a non-empty list of non-negative integers"
            )
        if vocab_size is not None and max(st.ids) >= vocab_size:
            raise SafeSteerError(
                f"{path}: safety-token id {max(st.ids)} is outside the vocabulary ({vocab_size})"
            )
        return st

    def table(self, n: int = 20) -> str:
        rows = [f"{'rank':>4}  {'token':<18} {'score':>10} {'p_base':>9} {'p_steered':>9}"]
        for i, (s, sc, pb, ps) in enumerate(zip(self.strings, self.scores, self.p_base, self.p_steered)):
            if i >= n:
                break
            rows.append(f"{i + 1:>4}  {s!r:<18} {sc:>10.4g} {pb:>9.4f} {ps:>9.4f}")
        return "\n".join(rows)


def banned_ids(tok, vocab_size: int) -> torch.Tensor:
    """Bool mask (V,): special tokens, the reasoning-block markers and any token whose text contains ``<|``."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tok.all_special_ids) | set(reasoning_ids(tok) or ())
    for tid, t in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False):
            special.add(tid)
    for tid in special:
        if 0 <= tid < vocab_size:
            banned[tid] = True
    for tid in range(min(vocab_size, len(tok))):
        if "<|" in tok.decode([tid]):
            banned[tid] = True
    if len(tok) < vocab_size:
        banned[len(tok) :] = True  # padding rows of the embedding matrix are not tokens
    return banned


def _forced_logprobs(
    model, prompt_texts, completions, horizon, tok, teacher: Teacher | None = None
) -> torch.Tensor:
    """Log-probs (N,H,V) over the last H positions of prompt + completion (completion padded to H-1),
    as ``teacher`` (steered on the left-padded prompt columns) or as the model itself."""
    tok.padding_side = "left"
    enc = tok(list(prompt_texts), return_tensors="pt", padding=True, add_special_tokens=False)
    comp = torch.full((len(completions), horizon - 1), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros_like(comp)
    for i, c in enumerate(completions):
        c = c[: horizon - 1]
        comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[i, : len(c)] = 1
    ids = torch.cat([enc["input_ids"], comp], 1).to(model.device)
    att = torch.cat([enc["attention_mask"], cmask], 1).to(model.device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    width = enc["input_ids"].shape[1]
    mask = (torch.arange(ids.shape[1]) < width).float().expand(ids.shape[0], -1)
    ctx = teacher.apply(model, True, mask) if teacher is not None else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -horizon:].float()
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def accumulate(
    model,
    tok,
    teacher: Teacher,
    instructions: Sequence[str],
    samples_per_prompt: int,
    horizon: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    keep_deltas: bool = False,
    progress=None,
) -> dict:
    """Steered samples on ``instructions``, teacher-forced through the steered and the unsteered
    model: sums over valid positions of Δ, p_steered, p_base and p_steered·Δ (each (V,) float64),
    their count ``n``, and (``keep_deltas``) the valid rows of Δ."""
    V = model.get_output_embeddings().weight.shape[0]
    eot = torch.tensor(sorted(stop_token_ids(model, tok)))
    sum_delta = torch.zeros(V, dtype=torch.float64)
    sum_ps = torch.zeros(V, dtype=torch.float64)
    sum_pb = torch.zeros(V, dtype=torch.float64)
    sum_kl = torch.zeros(V, dtype=torch.float64)
    n_valid = 0
    deltas: list[torch.Tensor] = []  # valid rows of Δ, kept only for voting
    for i in range(0, len(instructions), batch_size):
        chunk = list(instructions[i : i + batch_size])
        t_texts = teacher.prompt_texts(tok, chunk)
        b_texts = chat_texts(tok, chunk)
        with teacher.apply(model):
            comps = (
                generate(
                    model,
                    tok,
                    t_texts,
                    horizon - 1,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    num_return_sequences=samples_per_prompt,
                    batch_size=len(t_texts),
                )
                if horizon > 1
                else [[] for _ in range(len(chunk) * samples_per_prompt)]
            )
        t_rep = [t for t in t_texts for _ in range(samples_per_prompt)]
        lp_s = _forced_logprobs(model, t_rep, comps, horizon, tok, teacher)
        b_rep = [t for t in b_texts for _ in range(samples_per_prompt)]
        lp_b = _forced_logprobs(model, b_rep, comps, horizon, tok)
        # valid: position h predicts completion token h; it exists for h <= len(completion)
        lens = torch.tensor([len(c) for c in comps])
        h_idx = torch.arange(horizon)
        valid = h_idx.unsqueeze(0) <= lens.unsqueeze(1)
        # mask positions after the unsteered argmax reaches an end-of-turn token
        is_eot = torch.isin(lp_b.argmax(-1).cpu(), eot)
        first = torch.where(is_eot.any(1), is_eot.float().argmax(1), torch.full_like(lens, horizon))
        valid &= h_idx.unsqueeze(0) <= first.unsqueeze(1)
        # and positions inside a reasoning block (<think>...</think>): thinking is not the answer
        think = reasoning_ids(tok)
        if think is not None:
            skip = [
                reasoning_length(c, think) if think[1] in c or not c or c[0] != think[0] else horizon + 1
                for c in comps
            ]
            valid &= h_idx.unsqueeze(0) >= torch.tensor(skip).unsqueeze(1)
        vs, vb = lp_s[valid.to(lp_s.device)].cpu(), lp_b[valid.to(lp_b.device)].cpu()  # (n,V)
        d = vs - vb
        ps, pb = vs.exp(), vb.exp()
        sum_delta += d.sum(0, dtype=torch.float64)
        sum_ps += ps.sum(0, dtype=torch.float64)
        sum_pb += pb.sum(0, dtype=torch.float64)
        sum_kl += (ps * d).sum(0, dtype=torch.float64)
        n_valid += d.shape[0]
        if keep_deltas:
            deltas.append(d)
        if progress is not None:
            progress.update(len(chunk))
    return {
        "delta": sum_delta,
        "ps": sum_ps,
        "pb": sum_pb,
        "kl": sum_kl,
        "n": n_valid,
        "deltas": deltas,
    }


def rank_tokens(
    method: str,
    acc: dict,
    banned: torch.Tensor,
    k: int,
    vote_top: int = 200,
    min_steered_prob: float = 1e-6,
    harmful: dict | None = None,
    contrast_weight: float = 1.0,
) -> tuple[list[int], torch.Tensor]:
    """Rank the vocabulary by ``method`` (see the module docstring) from :func:`accumulate`'s
    statistics; pure. ``banned`` (V,) bool marks ids that may never be chosen; ids whose mean steered
    probability is below ``min_steered_prob`` are banned too. ``harmful`` is the accumulation on the
    harmful prompts (``method="contrast"`` only). Returns the chosen ids, best first (at most ``k``),
    and the (V,) score they were ranked by."""
    V, n_valid = acc["ps"].shape[0], acc["n"]
    mean_ps, mean_pb = acc["ps"] / n_valid, acc["pb"] / n_valid
    banned = banned | (mean_ps < min_steered_prob)
    if method == "vote":
        votes = torch.zeros(V, dtype=torch.float64)
        top = min(vote_top, V)
        for d in acc["deltas"]:
            d = d.masked_fill(banned, float("-inf"))
            idx = d.topk(top, dim=-1).indices.flatten()
            votes += torch.bincount(idx, minlength=V).double()
        score = votes.masked_fill(banned, 0.0)
        mean_delta = acc["delta"] / n_valid
        order = sorted(range(V), key=lambda v: (-score[v].item(), -mean_delta[v].item()))[: k * 2]
        chosen = [v for v in order if score[v] > 0][:k]
    elif method == "contrast":
        # what steering adds on harmful prompts, minus what the original model uses on benign ones
        score = harmful["kl"] / harmful["n"] - contrast_weight * mean_pb
        banned = banned | (harmful["ps"] / harmful["n"] < min_steered_prob)
        score = score.masked_fill(banned, float("-inf"))
        chosen = [v for v in score.topk(min(k, V)).indices.tolist() if torch.isfinite(score[v])]
    elif method in ("mean", "kl"):
        score = (acc["delta"] if method == "mean" else acc["kl"]) / n_valid
        score = score.masked_fill(banned, float("-inf"))
        chosen = [v for v in score.topk(min(k, V)).indices.tolist() if torch.isfinite(score[v])]
    else:
        raise SafeSteerError(f"tokens.method={method}: choose one of {', '.join(TOKEN_METHODS)}")
    if not chosen:
        raise SafeSteerError(
            f"safety-token selection ({method}) kept no token; lower tokens.min_steered_prob"
        )
    return chosen, score


def package_tokens(
    tok,
    method: str,
    chosen: list[int],
    score: torch.Tensor,
    acc: dict,
    settings: dict,
    n_prompts: int,
    n_harmful_prompts: int = 0,
    contrast_weight: float = 1.0,
) -> SafetyTokens:
    """The :class:`SafetyTokens` of ``chosen`` (from :func:`rank_tokens`): strings, scores, mean
    base/steered probabilities and masses from :func:`accumulate`'s ``acc``; as meta, the selection
    ``settings``, the prompt counts and the number of valid positions."""
    n_valid = acc["n"]
    mean_ps, mean_pb = acc["ps"] / n_valid, acc["pb"] / n_valid
    ids = torch.tensor(chosen)
    return SafetyTokens(
        ids=chosen,
        strings=[tok.decode([v]) for v in chosen],
        scores=[float(score[v]) for v in chosen],
        p_base=[float(mean_pb[v]) for v in chosen],
        p_steered=[float(mean_ps[v]) for v in chosen],
        method=method,
        student_mass=float(mean_pb[ids].sum()),
        steered_mass=float(mean_ps[ids].sum()),
        meta=dict(
            **settings,
            n_prompts=n_prompts,
            n_valid_positions=n_valid,
            **(
                {"n_harmful_prompts": n_harmful_prompts, "contrast_weight": contrast_weight}
                if method == "contrast"
                else {}
            ),
        ),
    )


def select_safety_tokens(
    model,
    tok,
    teacher: Teacher,
    instructions: Sequence[str],
    method: str = "kl",
    k: int = 50,
    samples_per_prompt: int = 8,
    horizon: int = 7,
    temperature: float = 1.0,
    top_p: float = 1.0,
    vote_top: int = 200,
    min_steered_prob: float = 1e-6,
    min_student_mass: float = 1e-3,
    batch_size: int = 4,
    progress=None,
    harmful: Sequence[str] = (),
    contrast_weight: float = 1.0,
) -> SafetyTokens:
    """Select the global safety-token set (see the module docstring): :func:`accumulate`, then
    :func:`rank_tokens`, then :func:`package_tokens`. ``batch_size`` counts prompts.
    ``harmful`` (prompts) and ``contrast_weight`` are used by ``method="contrast"``."""
    if method not in TOKEN_METHODS:
        raise SafeSteerError(f"tokens.method={method}: choose one of {', '.join(TOKEN_METHODS)}")
    if horizon < 1 or k < 1 or samples_per_prompt < 1:
        raise SafeSteerError("tokens.horizon, tokens.k and tokens.samples_per_prompt must be >= 1")
    if method == "contrast" and not harmful:
        raise SafeSteerError("tokens.method=contrast needs harmful prompts (tokens.harmful)")
    sampling = dict(
        samples_per_prompt=samples_per_prompt, horizon=horizon, temperature=temperature, top_p=top_p
    )
    kw = dict(batch_size=batch_size, progress=progress, **sampling)
    acc = accumulate(model, tok, teacher, instructions, keep_deltas=method == "vote", **kw)
    if acc["n"] == 0:
        raise SafeSteerError("safety-token selection found no valid positions (every sample ended at once)")
    harmful_acc = None
    if method == "contrast":
        harmful_acc = accumulate(model, tok, teacher, harmful, **kw)
        if harmful_acc["n"] == 0:
            raise SafeSteerError("safety-token selection found no valid position on the harmful prompts")
    banned = banned_ids(tok, acc["ps"].shape[0])
    chosen, score = rank_tokens(
        method, acc, banned, k, vote_top, min_steered_prob, harmful_acc, contrast_weight
    )
    settings = dict(k=k, **sampling, vote_top=vote_top, min_steered_prob=min_steered_prob)
    st = package_tokens(
        tok, method, chosen, score, acc, settings, len(instructions), len(harmful), contrast_weight
    )
    if st.student_mass < min_student_mass:
        raise SafeSteerError(
            f"the {method} safety-token set carries only {st.student_mass:.2e} of the student's probability mass "
            f"(< tokens.min_student_mass={min_student_mass:g}): the localized loss would be ~0 and nothing would "
            f"train; use tokens.method=kl or set tokens.min_student_mass=0 to proceed anyway"
        )
    return st
