"""Typed configuration: what each option is and which values it takes.

Every module that reads a config group declares it next to its code as a dataclass whose fields use
:func:`option`; :mod:`safesteer.config` registers them with Hydra's ConfigStore as the schema of
``conf/``. Types are enforced by OmegaConf while the config is composed; the bounds and choices
given to :func:`option` are checked by :func:`check`. Either way a bad value is refused at start with
one line, ``key=value: why``. The values themselves, with their documentation, live in ``conf/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, get_type_hints

from omegaconf import MISSING, OmegaConf

from safesteer.errors import SafeSteerError


def option(
    *,
    ge: float | None = None,
    gt: float | None = None,
    fraction: str | None = None,
    choices: Sequence | None = None,
    why: str | None = None,
    default: Any = MISSING,
) -> Any:
    """A config field. ``ge``/``gt``: lower bounds; ``fraction``: in [0, 1] with the included ends
    named, e.g. "[)" for [0, 1); ``choices``: the allowed values; ``why``: the message when a bound
    fails. Its value comes from ``conf/`` (``default`` only for nested groups and containers)."""
    meta = {
        "ge": ge,
        "gt": gt,
        "fraction": fraction,
        "choices": tuple(choices) if choices else None,
        "why": why,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def group(cls) -> Any:
    """A nested config group (its values come from ``conf/``)."""
    return dataclasses.field(default_factory=cls)


def typed(node):
    """A composed config group as its dataclass (what the actors receive: attributes, not dict keys)."""
    return OmegaConf.to_object(node)


def fail(key: str, value, why: str) -> None:
    raise SafeSteerError(f"{key}={value}: {why}")


def require(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        fail(key, value, why)


def _ok(value, meta: dict) -> str | None:
    """Why ``value`` breaks the field's bounds, or None."""
    if value is None:
        return None
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"choose one of {', '.join(map(str, meta['choices']))}"
    if meta.get("ge") is not None and value < meta["ge"]:
        return meta["why"] or f"must be >= {meta['ge']:g}"
    if meta.get("gt") is not None and value <= meta["gt"]:
        return meta["why"] or f"must be > {meta['gt']:g}"
    if meta.get("fraction"):
        lo, hi = meta["fraction"]
        if not ((value >= 0 if lo == "[" else value > 0) and (value <= 1 if hi == "]" else value < 1)):
            return f"must be in {lo}0, 1{hi}"
    return None


def _is_group(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def check(node, schema: type, prefix: str = "", shown: dict | None = None) -> None:
    """Check every field of ``node`` (a composed config or one of its groups) against ``schema``;
    ``shown`` maps keys to values as the user wrote them (for the message)."""
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, value = prefix + f.name, getattr(node, f.name)
        if _is_group(hints[f.name]):
            check(value, hints[f.name], key + ".", shown)
            continue
        why = _ok(value, dict(f.metadata))
        if why:
            fail(key, (shown or {}).get(key, value), why)


def declared_keys(schema: type, prefix: str = "") -> list[str]:
    """Every option's dotted key (for the dead-option test and the docs)."""
    out, hints = [], get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if _is_group(hints[f.name]):
            out += declared_keys(hints[f.name], prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out
