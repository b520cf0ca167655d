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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from safesteer.core.generation import (
    batches,
    chat_texts,
    generate,
    reasoning_ids,
    reasoning_length,
    stop_token_ids,
)
from safesteer.core.steering import Teacher
from safesteer.errors import SafeSteerError

TOKEN_METHODS = ("vote", "mean", "kl", "contrast")


# the selection settings a token file records (in this order)
META_SETTINGS = ("k", "samples_per_prompt", "horizon", "temperature", "top_p", "vote_top", "min_steered_prob")


@dataclass(frozen=True)
class TokenSelection:
    """How the safety tokens are selected (``conf/tokens``; see the module docstring): ``method`` and set
    size ``k``; S = ``samples_per_prompt`` steered samples of horizon H = ``horizon`` per prompt, drawn at
    ``temperature`` / ``top_p``; ``batch_size`` prompts per forward. An invalid method or size is
    refused here, so every function below may trust it."""

    method: str = "kl"
    k: int = 50
    samples_per_prompt: int = 8
    horizon: int = 7
    temperature: float = 1.0
    top_p: float = 1.0
    vote_top: int = 200  # vote: each valid position votes for its top-vote_top tokens
    min_steered_prob: float = 1e-6  # ids with a lower mean steered probability are banned
    min_student_mass: float = 1e-3  # refuse a set carrying less of the student's mass (0: never)
    batch_size: int = 4
    contrast_weight: float = 1.0  # contrast: the weight of the original model's benign probability

    def __post_init__(self) -> None:
        if self.method not in TOKEN_METHODS:
            raise SafeSteerError(f"tokens.method={self.method}: choose one of {', '.join(TOKEN_METHODS)}")
        if min(self.horizon, self.k, self.samples_per_prompt) < 1:
            raise SafeSteerError("tokens.horizon, tokens.k and tokens.samples_per_prompt must be >= 1")


@dataclass
class TokenStats:
    """Sums over the valid (sample, position) rows of Δ, p_steered, p_base and p_steered·Δ (each (V,)
    float64), their count ``n`` and, for voting only, the valid rows of Δ themselves."""

    delta: torch.Tensor
    ps: torch.Tensor
    pb: torch.Tensor
    kl: torch.Tensor
    n: int = 0
    deltas: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def zeros(cls, vocab_size: int) -> TokenStats:
        return cls(*(torch.zeros(vocab_size, dtype=torch.float64) for _ in range(4)))

    @property
    def mean_ps(self) -> torch.Tensor:
        return self.ps / self.n

    @property
    def mean_pb(self) -> torch.Tensor:
        return self.pb / self.n

    def add(self, lp_steered: torch.Tensor, lp_base: torch.Tensor, keep_deltas: bool = False) -> None:
        """Add valid rows (n, V) of the steered and the unsteered log-probs."""
        d = lp_steered - lp_base
        ps, pb = lp_steered.exp(), lp_base.exp()
        self.delta += d.sum(0, dtype=torch.float64)
        self.ps += ps.sum(0, dtype=torch.float64)
        self.pb += pb.sum(0, dtype=torch.float64)
        self.kl += (ps * d).sum(0, dtype=torch.float64)
        self.n += d.shape[0]
        if keep_deltas:
            self.deltas.append(d)


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


def _sample(model, tok, teacher: Teacher, texts: Sequence[str], selection: TokenSelection) -> list[list[int]]:
    """``samples_per_prompt`` completions of ``horizon - 1`` tokens per prompt text, sampled from the
    steered model (none to sample when ``horizon == 1``)."""
    s = selection
    with teacher.apply(model):
        if s.horizon == 1:
            return [[] for _ in range(len(texts) * s.samples_per_prompt)]
        return generate(
            model,
            tok,
            texts,
            s.horizon - 1,
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            num_return_sequences=s.samples_per_prompt,
            batch_size=len(texts),
        )


def valid_positions(
    base_argmax: torch.Tensor,
    completions: Sequence[Sequence[int]],
    horizon: int,
    eot: torch.Tensor,
    think: tuple[int, int] | None,
) -> torch.Tensor:
    """(N, H) bool: the (sample, position) rows that count. Position h predicts completion token h, so it
    exists for h <= len(completion); positions after the unsteered argmax ``base_argmax`` (N, H) first
    reaches an end-of-turn id in ``eot``, and positions inside a reasoning block (``think``: the ids of
    ``<think>`` and ``</think>``; thinking is not the answer), are masked."""
    lens = torch.tensor([len(c) for c in completions])
    h_idx = torch.arange(horizon).unsqueeze(0)
    valid = h_idx <= lens.unsqueeze(1)
    is_eot = torch.isin(base_argmax, eot)
    first = torch.where(is_eot.any(1), is_eot.float().argmax(1), torch.full_like(lens, horizon))
    valid &= h_idx <= first.unsqueeze(1)
    if think is not None:
        skip = [
            reasoning_length(c, think) if think[1] in c or not c or c[0] != think[0] else horizon + 1
            for c in completions
        ]
        valid &= h_idx >= torch.tensor(skip).unsqueeze(1)
    return valid


@torch.no_grad()
def accumulate(
    model,
    tok,
    teacher: Teacher,
    instructions: Sequence[str],
    selection: TokenSelection,
    keep_deltas: bool = False,
    progress=None,
) -> TokenStats:
    """Steered samples on ``instructions`` (``selection.batch_size`` prompts at a time), teacher-forced
    through the steered and the unsteered model: the :class:`TokenStats` of the valid positions
    (:func:`valid_positions`), with the rows of Δ when ``keep_deltas``."""
    S, H = selection.samples_per_prompt, selection.horizon
    stats = TokenStats.zeros(model.get_output_embeddings().weight.shape[0])
    eot = torch.tensor(sorted(stop_token_ids(model, tok)))
    for chunk in batches(list(instructions), selection.batch_size):
        t_texts, b_texts = teacher.prompt_texts(tok, chunk), chat_texts(tok, chunk)
        comps = _sample(model, tok, teacher, t_texts, selection)
        lp_s = _forced_logprobs(model, [t for t in t_texts for _ in range(S)], comps, H, tok, teacher)
        lp_b = _forced_logprobs(model, [t for t in b_texts for _ in range(S)], comps, H, tok)
        valid = valid_positions(lp_b.argmax(-1).cpu(), comps, H, eot, reasoning_ids(tok))
        stats.add(lp_s[valid.to(lp_s.device)].cpu(), lp_b[valid.to(lp_b.device)].cpu(), keep_deltas)
        if progress is not None:
            progress.update(len(chunk))
    return stats


def _votes(deltas: Sequence[torch.Tensor], banned: torch.Tensor, vote_top: int) -> torch.Tensor:
    """(V,) float64: how many rows of Δ have each unbanned id among their top ``vote_top``."""
    V = banned.shape[0]
    votes = torch.zeros(V, dtype=torch.float64)
    top = min(vote_top, V)
    for d in deltas:
        d = d.masked_fill(banned, float("-inf"))
        idx = d.topk(top, dim=-1).indices.flatten()
        votes += torch.bincount(idx, minlength=V).double()
    return votes.masked_fill(banned, 0.0)


def rank_tokens(
    stats: TokenStats,
    banned: torch.Tensor,
    selection: TokenSelection,
    harmful: TokenStats | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Rank the vocabulary by ``selection.method`` (see the module docstring) from :func:`accumulate`'s
    statistics; pure. ``banned`` (V,) bool marks ids that may never be chosen; ids whose mean steered
    probability is below ``selection.min_steered_prob`` are banned too. ``harmful`` is the accumulation
    on the harmful prompts (``method="contrast"`` only). Returns the chosen ids, best first (at most
    ``selection.k``), and the (V,) score they were ranked by."""
    s, V = selection, stats.ps.shape[0]
    banned = banned | (stats.mean_ps < s.min_steered_prob)
    if s.method == "vote":
        score = _votes(stats.deltas, banned, s.vote_top)
        mean_delta = stats.delta / stats.n
        order = sorted(range(V), key=lambda v: (-score[v].item(), -mean_delta[v].item()))[: s.k * 2]
        chosen = [v for v in order if score[v] > 0][: s.k]
    else:
        if s.method == "contrast":
            # what steering adds on harmful prompts, minus what the original model uses on benign ones
            score = harmful.kl / harmful.n - s.contrast_weight * stats.mean_pb
            banned = banned | (harmful.mean_ps < s.min_steered_prob)
        else:  # mean, kl
            score = (stats.delta if s.method == "mean" else stats.kl) / stats.n
        score = score.masked_fill(banned, float("-inf"))
        chosen = [v for v in score.topk(min(s.k, V)).indices.tolist() if torch.isfinite(score[v])]
    if not chosen:
        raise SafeSteerError(
            f"safety-token selection ({s.method}) kept no token; lower tokens.min_steered_prob"
        )
    return chosen, score


def package_tokens(
    tok,
    chosen: list[int],
    score: torch.Tensor,
    stats: TokenStats,
    selection: TokenSelection,
    n_prompts: int,
    n_harmful_prompts: int = 0,
) -> SafetyTokens:
    """The :class:`SafetyTokens` of ``chosen`` (from :func:`rank_tokens`): strings, scores, mean
    base/steered probabilities and masses from :func:`accumulate`'s ``stats``; as meta, the selection's
    settings, the prompt counts and the number of valid positions."""
    s, ids = selection, torch.tensor(chosen)
    mean_ps, mean_pb = stats.mean_ps, stats.mean_pb
    meta = {k: v for k, v in asdict(s).items() if k in META_SETTINGS}
    meta.update(n_prompts=n_prompts, n_valid_positions=stats.n)
    if s.method == "contrast":
        meta.update(n_harmful_prompts=n_harmful_prompts, contrast_weight=s.contrast_weight)
    return SafetyTokens(
        ids=chosen,
        strings=[tok.decode([v]) for v in chosen],
        scores=[float(score[v]) for v in chosen],
        p_base=[float(mean_pb[v]) for v in chosen],
        p_steered=[float(mean_ps[v]) for v in chosen],
        method=s.method,
        student_mass=float(mean_pb[ids].sum()),
        steered_mass=float(mean_ps[ids].sum()),
        meta=meta,
    )


def select_safety_tokens(
    model,
    tok,
    teacher: Teacher,
    instructions: Sequence[str],
    selection: TokenSelection,
    harmful: Sequence[str] = (),
    progress=None,
) -> SafetyTokens:
    """Select the global safety-token set (see the module docstring) on the harmless prompts
    ``instructions``: :func:`accumulate`, then :func:`rank_tokens`, then :func:`package_tokens`.
    ``harmful`` (prompts) is used by ``method="contrast"``; ``progress`` advances by one per prompt."""
    s = selection
    if s.method == "contrast" and not harmful:
        raise SafeSteerError("tokens.method=contrast needs harmful prompts (tokens.harmful)")
    stats = accumulate(model, tok, teacher, instructions, s, s.method == "vote", progress)
    if stats.n == 0:
        raise SafeSteerError("safety-token selection found no valid positions (every sample ended at once)")
    harmful_stats = None
    if s.method == "contrast":
        harmful_stats = accumulate(model, tok, teacher, harmful, s, progress=progress)
        if harmful_stats.n == 0:
            raise SafeSteerError("safety-token selection found no valid position on the harmful prompts")
    chosen, score = rank_tokens(stats, banned_ids(tok, stats.ps.shape[0]), s, harmful_stats)
    st = package_tokens(tok, chosen, score, stats, s, len(instructions), len(harmful))
    if st.student_mass < s.min_student_mass:
        raise SafeSteerError(
            f"the {s.method} safety-token set carries only {st.student_mass:.2e} of the student's probability mass "
            f"(< tokens.min_student_mass={s.min_student_mass:g}): the localized loss would be ~0 and nothing would "
            f"train; use tokens.method=kl or set tokens.min_student_mass=0 to proceed anyway"
        )
    return st
