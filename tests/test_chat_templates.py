"""Chat templates of the preset families (the twins' tokenizers), Qwen3's thinking switch, reasoning
blocks kept out of the judge, the loss and the safety-token positions, and the tokenizer checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safesteer.core.batch import assemble, collate
from safesteer.core.generation import chat_texts, reasoning_ids, reasoning_length
from safesteer.core.judge import answer_of, judge, opening_key
from safesteer.errors import SafeSteerError


@pytest.fixture(scope="module")
def toks(default_model_dir):
    from safesteer.twins import FAMILIES, twin_tokenizer

    return {f: twin_tokenizer(f, default_model_dir) for f in FAMILIES}


def saved(tok, path: Path) -> str:
    tok.save_pretrained(path)
    return str(path)


def test_each_family_formats_prompts_its_own_way(toks, tmp_path):
    from safesteer.models import load_tokenizer

    expect = {
        "qwen3": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "qwen2": "<|im_start|>system\nYou are Qwen",
        "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "mistral": "<s>[INST] Hi [/INST]",
    }
    for family, text in expect.items():
        tok = load_tokenizer(saved(toks[family], tmp_path / family))  # passes the tokenizer checks
        got = chat_texts(tok, ["Hi"])[0]
        assert text in got, (family, got)
        # the end-of-turn token is one token, and the system prompt is used
        assert len(tok(tok.eos_token, add_special_tokens=False)["input_ids"]) == 1
        assert "Be brief." in chat_texts(tok, ["Hi"], system="Be brief.")[0]


def test_qwen3_thinking_switch_through_chat_template_kwargs(toks, tmp_path):
    from safesteer.models import load_tokenizer

    path = saved(toks["qwen3"], tmp_path / "qwen3")
    off = load_tokenizer(path, chat_template_kwargs={"enable_thinking": False})
    on = load_tokenizer(path, chat_template_kwargs={"enable_thinking": True})
    assert chat_texts(off, ["Hi"])[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat_texts(on, ["Hi"])[0].endswith("<|im_start|>assistant\n")
    assert (
        reasoning_ids(on) is not None
        and reasoning_ids(load_tokenizer(saved(toks["llama3"], tmp_path / "l"))) is None
    )


def test_reasoning_blocks_are_not_judged():
    assert answer_of(
        "<think>\nThe user wants a bomb.\n</think>\n\nI'm sorry, but I can't help with that."
    ) == ("\n\nI'm sorry, but I can't help with that.")
    assert judge("<think>\n\n</think>\n\nI'm sorry, but I can't help with that request.").refused
    # thinking about refusing is not a refusal: the answer after it complies
    assert not judge(
        "<think>I cannot do this... actually I can.</think> Sure, here are the steps you asked for."
    ).refused
    assert judge("<think>I can't decide what to say here at all").label == "degenerate"  # never answered
    assert opening_key("<think>x</think> I'm sorry, but I can't help.") == opening_key(
        "I'm sorry, but I can't help."
    )


def test_reasoning_tokens_are_not_trained():
    think = (7, 8)
    assert reasoning_length([7, 1, 2, 8, 3, 4], think) == 4
    assert reasoning_length([3, 7, 8], think) == 0  # does not open with a block
    assert reasoning_length([7, 1, 2], think) == 3  # never closed: all thinking
    assert reasoning_length([3, 4], None) == 0
    b = collate([[1, 2], [1, 2]], [[7, 5, 8, 3, 4], [3, 4, 5, 6, 9]], 0, skip=[3, 0])
    # row 0: positions 1..5 predict the completion; the first three (7, 5, 8) are masked
    assert b["completion_mask"][0].tolist() == [0, 0, 0, 0, 1, 1]
    assert b["completion_mask"][1].tolist() == [0, 1, 1, 1, 1, 1]
    teacher = {"logprobs": torch.zeros(2, 5, 3), "ids": torch.zeros(2, 5, 3, dtype=torch.long)}
    a = assemble([[1, 2], [1, 2]], [[7, 5, 8, 3, 4], [3, 4, 5, 6, 9]], [True, True], teacher, 0, 1.0, think)
    assert torch.equal(a["completion_mask"], b["completion_mask"])
    plain = assemble([[1, 2], [1, 2]], [[7, 5, 8, 3, 4], [3, 4, 5, 6, 9]], [True, True], teacher, 0, 1.0)
    assert plain["completion_mask"][0].tolist() == [0, 1, 1, 1, 1, 1]


def test_reasoning_markers_are_never_safety_tokens(toks):
    from safesteer.core.tokens import banned_ids

    tok = toks["qwen3"]
    banned = banned_ids(tok, len(tok))
    assert all(banned[i] for i in reasoning_ids(tok))


def test_a_tokenizer_without_a_chat_template_is_refused(toks, tmp_path):
    from safesteer.models import load_tokenizer

    tok = toks["qwen2"]
    path = saved(tok, tmp_path / "plain")
    cfg = json.loads((Path(path) / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in Path(path).glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(SafeSteerError, match="has no chat template") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)


def test_a_tokenizer_lacking_its_templates_special_tokens_is_refused(toks, default_model_dir, tmp_path):
    """The Llama 3 template on the bundled tokenizer without the Llama 3 special tokens: <|eot_id|>
    would be split into pieces and no answer would end."""
    from transformers import AutoTokenizer

    from safesteer.models import load_tokenizer
    from safesteer.twins import LLAMA3_TEMPLATE

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.chat_template = LLAMA3_TEMPLATE
    path = saved(tok, tmp_path / "broken")
    with pytest.raises(SafeSteerError, match="does not end with the eos token"):
        load_tokenizer(path)
