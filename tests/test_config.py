"""The typed config: no dead options, no undeclared reads, and every command in the docs composes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from safesteer.config import Config, compose
from safesteer.schema import declared_keys

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {p: p.read_text(encoding="utf-8") for p in (ROOT / "safesteer").rglob("*.py")}


def _declaring_module(key: str) -> str:
    """The module that declares the group holding ``key`` (it reads its options as attributes)."""
    from typing import get_type_hints

    node = Config
    for part in key.split(".")[:-1]:
        node = get_type_hints(node)[part]
    return node.__module__


def _module_source(module: str) -> str:
    rel = module.replace(".", "/")
    path = ROOT / f"{rel}.py" if (ROOT / f"{rel}.py").exists() else ROOT / rel / "__init__.py"
    return SOURCES[path]


def test_every_declared_option_is_read():
    """A key declared in the schema is read: as ``group.key`` anywhere, or as ``.key`` in a module
    that names its group (``cfg.rollout``, ``"rollout"``) or declares it (the actors receive their
    group as a dataclass and read ``cfg.key``)."""
    everything = "\n".join(SOURCES.values())
    dead = []
    for key in declared_keys(Config):
        *groups, leaf = key.split(".")
        if not groups:
            if not re.search(rf"cfg\.{leaf}\b|\"{leaf}\"", everything):
                dead.append(key)
            continue
        if re.search(rf"\b{re.escape(key)}\b", everything):
            continue
        naming = [t for t in SOURCES.values() if re.search(rf"\bcfg\.{groups[-1]}\b|\"{groups[-1]}\"", t)]
        naming.append(_module_source(_declaring_module(key)))
        if not any(re.search(rf"\.{leaf}\b", t) for t in naming):
            dead.append(key)
    assert not dead, f"declared but never read: {dead}"


def test_every_read_option_is_declared():
    """Every ``cfg.group.key`` read in the package is a declared option or group, and every
    ``cfg.key`` (a whole config, or one group as a dataclass) is a declared name; a group's own
    code reads its nested groups relative to it (``cfg.lora.r`` in the learner's)."""
    declared = set(declared_keys(Config))
    prefixes = {k.rsplit(".", i)[0] for k in declared for i in range(1, k.count(".") + 1)}
    relative = {k.split(".", i)[i] for k in declared | prefixes for i in range(1, k.count(".") + 1)}
    names = {k.split(".")[-1] for k in declared} | prefixes | relative
    methods = {"get", "items", "keys", "values", "copy"}
    undeclared = set()
    for text in SOURCES.values():
        for m in re.finditer(r"\bcfg\.((?:[a-z_0-9]+\.)*[a-z_0-9]+)\b(?!\()", text):
            k = m.group(1)
            if k.split(".")[-1] in methods:
                continue
            if "." in k and k not in declared and k not in prefixes and k not in relative:
                undeclared.add(k)
            elif "." not in k and k not in names:
                undeclared.add(k)
    assert not undeclared, f"read but not declared: {sorted(undeclared)}"


def test_the_schema_refuses_a_key_no_module_declares():
    from safesteer.errors import SafeSteerError

    with pytest.raises(SafeSteerError, match=r"^learner\.no_such_option=1: no such option$"):
        compose(["learner.no_such_option=1"])


def _doc_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m safesteer.run ...`` and ``make run ARGS="..."`` line in README.md and docs/."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text(encoding="utf-8").splitlines():
            for m in re.finditer(r"python -m safesteer\.run((?: [^`|#]*)?)", line):
                args = m.group(1).split("&&")[0].split(";")[0]
                out.append((f"{doc.name}: {line.strip()}", shlex.split(args)))
            for m in re.finditer(r'make run ARGS="([^"]*)"', line):
                out.append((f"{doc.name}: {line.strip()}", shlex.split(m.group(1))))
    return out


DOC_COMMANDS = _doc_commands()


def test_the_docs_have_run_commands_to_check():
    assert len(DOC_COMMANDS) >= 10, DOC_COMMANDS


@pytest.mark.parametrize(("where", "args"), DOC_COMMANDS, ids=[w for w, _ in DOC_COMMANDS])
def test_every_run_command_in_the_docs_composes(where, args):
    """The overrides of every documented command compose against today's config (placeholders in
    capitals, e.g. ``trainer.resume=PATH``, and Hydra's own flags are skipped)."""
    overrides = []
    for a in args:
        if a.startswith("-") or a.startswith("hydra") or "=" not in a:  # flags, Hydra's own, "<overrides>"
            continue
        key, _, value = a.partition("=")
        if re.fullmatch(r"[A-Z_./<>]+", value) or "DATE" in value or "RUN" in value:
            a = (
                f"{key}=null"
                if key.lstrip("+") in ("trainer.resume", "tokens.path", "steering.vector")
                else None
            )
            if a is None:
                continue
        if "," in value and not value.startswith("["):  # a multirun sweep: check its first value
            a = f"{key}={value.split(',')[0]}"
        overrides.append(a)
    compose(overrides, check=False)


def test_the_learner_teacher_needs_lora_and_the_label_gate():
    from safesteer.errors import SafeSteerError

    with pytest.raises(SafeSteerError, match=r"^teacher\.backend=learner: .*learner\.lora\.r > 0"):
        compose(["teacher.backend=learner"])
    with pytest.raises(SafeSteerError, match=r"^teacher\.gate=probe: "):
        compose(["teacher.backend=learner", "learner.lora.r=8", "teacher.gate=probe"])
    cfg = compose(["teacher.backend=learner", "learner.lora.r=8"])
    from safesteer.workers import roles

    assert {r.name: r.count for r in roles(cfg)}["teacher"] == 0  # no teacher actor is started
