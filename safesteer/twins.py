"""Tiny random twins of the architectures the paper presets run, for tests and smoke runs.

A twin has its family's real config class and the features that matter to SafeSteer (Qwen3's q/k
norms, Qwen2's attention biases, Llama 3's rope scaling, untied heads as in the presets' models),
at a size the CPU runs in seconds: a few layers of width 64 (head_dim 32, as vLLM's CPU attention
needs). Its tokenizer is the bundled one (the default model's) with the family's chat-template
conventions added: its special tokens, its template, its end-of-turn token. Nothing is fetched.

    python -m safesteer.twins qwen3 /tmp/tiny-qwen3      # writes the twin's HF directory

Families: ``qwen3`` (Qwen3ForCausalLM, template with ``enable_thinking``), ``qwen2``
(Qwen2ForCausalLM as Qwen2.5-7B), ``llama3`` (LlamaForCausalLM as Llama-3-8B) and ``mistral``
(MistralForCausalLM, ``[INST]`` template without a system role of its own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from safesteer.errors import SafeSteerError, print_or_fail
from safesteer.models import prepare_default_model, tiny_config_kwargs
from safesteer.paths import atomic_dir

# Qwen3's conventions: ChatML, and <think>...</think> before the answer. With enable_thinking=false
# the template closes an empty think block in the prompt so that the model answers at once.
QWEN3_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Qwen2.5's: ChatML with a default system prompt.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3's: header tokens around each role, <|eot_id|> ends a turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Mistral's: [INST] ... [/INST]; a system prompt is put before the first user message.
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '[INST] ' + (system if loop.index0 <= 1 else '') + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- m['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

FAMILIES = {
    # family: (special tokens added, plain added tokens, bos, eos, chat template, config class)
    "qwen3": ((), ("<think>", "</think>"), None, "<|im_end|>", QWEN3_TEMPLATE, "Qwen3Config"),
    "qwen2": ((), (), None, "<|im_end|>", QWEN2_TEMPLATE, "Qwen2Config"),
    "llama3": (
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        (),
        "<|begin_of_text|>",
        "<|eot_id|>",
        LLAMA3_TEMPLATE,
        "LlamaConfig",
    ),
    "mistral": (("<s>", "</s>", "[INST]", "[/INST]"), (), "<s>", "</s>", MISTRAL_TEMPLATE, "MistralConfig"),
}


def twin_tokenizer(family: str, base_dir: str | Path):
    """The bundled tokenizer with ``family``'s special tokens, template and end-of-turn token."""
    special, plain, bos, eos, template, _ = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if plain:
        tok.add_tokens(list(plain))
    if bos is not None:
        tok.bos_token = bos
    tok.eos_token = eos
    tok.pad_token = eos
    tok.chat_template = template
    return tok


def twin_config(family: str, tok, num_hidden_layers: int = 4):
    """The family's config class at twin size, with the features its preset's model has."""
    common = tiny_config_kwargs(tok, num_hidden_layers, tied=False)
    extra = {
        "qwen3": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6),
        "qwen2": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6),
        "llama3": dict(
            rope_theta=500_000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
        "mistral": dict(rope_theta=1_000_000.0, sliding_window=None),
    }[family]
    return getattr(transformers, FAMILIES[family][5])(**common, **extra)


def build_twin(family: str, out: str | Path, base_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write ``family``'s twin (random weights, seeded) to ``out`` atomically; returns ``out``."""
    if family not in FAMILIES:
        raise SafeSteerError(f"unknown twin family {family!r}; choose one of {', '.join(FAMILIES)}")
    tok = twin_tokenizer(family, base_dir or prepare_default_model())
    cfg = twin_config(family, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safesteer.twins", description=__doc__.split("\n")[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("out", help="the directory to write (replaced atomically)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return print_or_fail(lambda: f"{build_twin(args.family, args.out, seed=args.seed)}\n")


if __name__ == "__main__":
    sys.exit(main())
