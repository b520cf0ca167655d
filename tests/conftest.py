"""Shared fixtures: the real default model directory and a tiny random Llama with its chat template."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The test models are tiny: intra-op threads buy nothing, and on a small shared machine OpenMP's
# spin-waiting makes them 10-30x slower under load. An explicit OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted default model (SmolLM2-135M-Instruct), prepared once in the SafeSteer cache."""
    from safesteer.models import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 6-layer Llama (hidden 64) with the default model's tokenizer and ChatML template."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from safesteer.models import tiny_llama_config

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = tiny_llama_config(tok, num_hidden_layers=6)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    """(model, tokenizer) of the tiny Llama, loaded with :func:`safesteer.models.load_hf`."""
    from safesteer.models import load_hf

    return load_hf(str(tiny_model_dir))
