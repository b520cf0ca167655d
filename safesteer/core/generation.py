"""Chat formatting and batched generation with an HF model.

Prompts are formatted with the tokenizer's chat template and end at the assistant's turn
(:func:`chat_texts`); batches are left-padded with explicit position ids (:func:`encode`), and
:func:`generate` returns the new token ids of each answer, cut at the first end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

TEMPLATE_KWARGS = "safesteer_chat_template_kwargs"


def chat_texts(tok, instructions: Sequence[str], system: str | None = None) -> list[str]:
    """Instructions formatted with the chat template, ending at the assistant's turn; with the
    template arguments (``model.chat_template_kwargs``) :func:`safesteer.models.load_tokenizer` gave
    the tokenizer."""
    kwargs = getattr(tok, TEMPLATE_KWARGS, {})
    out = []
    for ins in instructions:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": ins}
        ]
        out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs))
    return out


def reasoning_ids(tok) -> tuple[int, int] | None:
    """The ids of ``<think>`` and ``</think>`` when the tokenizer has them as single tokens (Qwen3)."""
    ids = [tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    if any(i is None or i == tok.unk_token_id for i in ids):
        return None
    return ids[0], ids[1]


def reasoning_length(completion: Sequence[int], think: tuple[int, int] | None) -> int:
    """How many leading tokens of ``completion`` are a ``<think>...</think>`` block (0 when it does not
    open with one; all of it when the block never closes): thinking, not the answer."""
    if think is None or not completion or completion[0] != think[0]:
        return 0
    try:
        return list(completion).index(think[1]) + 1
    except ValueError:
        return len(completion)


def post_instruction_tokens(tok) -> list[int]:
    """Token ids the chat template puts after the user's text (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)."""
    marker = "XQZJ"
    text = chat_texts(tok, [marker])[0]
    suffix = text[text.rindex(marker) + len(marker) :]
    return tok(suffix, add_special_tokens=False)["input_ids"]


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of at most ``size`` each."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def encode(tok, texts: Sequence[str], device) -> dict:
    """Left-padded ``input_ids`` and ``attention_mask`` on ``device``, with ``position_ids`` that skip the padding."""
    tok.padding_side = "left"
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return enc


def stop_token_ids(model, tok) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS plus the model's generation-config EOS ids."""
    cfg = model.generation_config.eos_token_id
    ids = set(cfg if isinstance(cfg, list) else [] if cfg is None else [cfg])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


@torch.no_grad()
def generate(
    model,
    tok,
    texts: Sequence[str],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    first_logprobs: list[torch.Tensor] | None = None,
) -> list[list[int]]:
    """HF generation from chat-formatted texts; returns the new token ids (EOS and padding stripped).

    With ``first_logprobs`` (a list), the float32 log-softmax of the first step's raw logits (the next
    token after each prompt, from the prefill generation runs anyway) is appended to it, one
    (B * num_return_sequences, V) tensor per batch: what a separate forward over the prompts would
    give (to float rounding).
    """
    eos = stop_token_ids(model, tok)
    out: list[list[int]] = []
    scored = first_logprobs is not None
    for chunk in batches(texts, batch_size):
        enc = encode(tok, chunk, model.device)
        enc.pop("position_ids")  # generate derives them from the attention mask
        kw = (
            dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if do_sample
            else dict(do_sample=False)
        )
        res = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tok.pad_token_id,
            **kw,
            **(dict(output_logits=True, return_dict_in_generate=True) if scored else {}),
        )
        if scored:
            first_logprobs.append(torch.log_softmax(res.logits[0].float(), -1))
            res = res.sequences
        seqs = res[:, enc["input_ids"].shape[1] :]
        for row in seqs.tolist():
            ids = []
            for t in row:
                if t in eos:
                    break
                ids.append(t)
            out.append(ids)
    return out


def generate_texts(
    model,
    tok,
    instructions: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    first_logprobs: list[torch.Tensor] | None = None,
) -> list[str]:
    ids = generate(
        model,
        tok,
        chat_texts(tok, instructions),
        max_new_tokens,
        batch_size=batch_size,
        first_logprobs=first_logprobs,
    )
    return [tok.decode(x, skip_special_tokens=True) for x in ids]
