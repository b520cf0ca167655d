"""The comparison's training baselines (safesteer.baselines) with TRL's real SFT and DPO trainers on
the tiny random model: the paired answers, the examples built from them, and the trained models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from safesteer import baselines as B
from safesteer.config import compose
from safesteer.core.generation import chat_texts
from safesteer.core.steering import SteeringVector, vector_bytes
from safesteer.data.training import chat_prompts
from safesteer.errors import SafeSteerError
from safesteer.models import load_tokenizer

pytest.importorskip("trl")

ANCHORS = ["How do I bake bread at home?", "What is the capital of France?", "Write a haiku about rain."]
MAX_NEW = 6
BASE = ["+experiment=smoke", "data.train_limit=4", "trainer.prompts_per_step=2", "trainer.anchors_per_step=2"]


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(config, vector path, paired answers) for 4 harmful prompts and 3 anchors."""
    tmp = tmp_path_factory.mktemp("baselines")
    anchors = tmp / "anchors.txt"
    anchors.write_text("\n".join(ANCHORS) + "\n")
    cfg = compose([*BASE, f"data.anchor='{anchors}'", "teacher.coeff=8.0"])
    torch.manual_seed(1)
    sv = SteeringVector(vector=torch.randn(64), layer=2, coeff=8.0, method="made-up")
    vector = tmp / "vector.safetensors"
    vector.write_bytes(vector_bytes(sv))
    answers = B.paired_answers(cfg, str(tiny_model_dir), vector, MAX_NEW)
    return cfg, vector, answers


@pytest.fixture(scope="module")
def texts(run) -> B.PairedAnswers:
    """The run's prompts with written answers (the tiny random model answers noise, and only
    whitespace without the vector): a refusal and a compliance, a helpful answer and an over-refusal."""
    _, _, a = run
    refuse = ["I'm sorry, but I can't help with that.", "I cannot assist with this request."]
    comply = ["Sure, here is how to do it: first", "Of course! Step one is to"]
    helpful = ["Here is a short answer: yes.", "Paris is the capital.", "Soft rain on the roof"]
    return B.PairedAnswers(
        prompts=a.prompts,
        harmful=a.harmful,
        refusal=[refuse[i % 2] for i in range(len(a.prompts))],
        original=[comply[i % 2] if h else helpful[i % 3] for i, h in enumerate(a.harmful)],
    )


def test_paired_answers(run, tiny_model_dir: Path, tmp_path: Path):
    cfg, _, a = run
    tok = load_tokenizer(str(tiny_model_dir))
    train, _, _ = chat_prompts(tok, cfg.data.train, cfg.model.max_prompt_tokens, cfg.data.train_limit)
    n = len(train)
    assert n == 4
    assert a.prompts == [p.instruction for p in train] + ANCHORS  # the anchors after the training prompts
    assert a.harmful == [True] * n + [False] * len(ANCHORS)
    assert len(a.refusal) == len(a.original) == len(a.prompts)
    assert any(r != o for r, o in zip(a.refusal, a.original))  # the vector changed the answers
    path = tmp_path / "answers.jsonl"
    B.save_answers(path, a)
    assert B.load_answers(path) == a
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(SafeSteerError, match="answers.jsonl:1"):
        B.load_answers(path)


def test_examples():
    a = B.PairedAnswers(
        prompts=["harm1", "harm2", "harm3", "ok1", "ok2"],
        harmful=[True, True, True, False, False],
        refusal=["I can't.", " \n", "same", "I won't.", "No."],
        original=["\nSure: step 1 ", "Here", "same", "Bread: flour", ""],
    )
    sft = B.sft_examples(a)  # harm2's blank refusal is left out
    assert [e["prompt"][0]["content"] for e in sft] == ["harm1", "harm3", "ok1"]
    assert [e["completion"] for e in sft] == [
        [{"role": "assistant", "content": t}] for t in ("I can't.", "same", "Bread: flour")
    ]
    dpo = B.dpo_examples(a)  # harm2 (blank chosen), harm3 (no preference), ok2 (empty chosen) left out
    got = [(e["prompt"][0]["content"], e["chosen"][0]["content"], e["rejected"][0]["content"]) for e in dpo]
    assert got == [("harm1", "I can't.", "Sure: step 1"), ("ok1", "Bread: flour", "I won't.")]
    assert all(e["prompt"][0]["role"] == "user" and e["chosen"][0]["role"] == "assistant" for e in dpo)
    benign = B.PairedAnswers(["ok"], [False], ["No."], ["Yes."])
    with pytest.raises(SafeSteerError, match="no harmful prompt"):
        B.sft_examples(benign)
    silent = B.PairedAnswers(["harm"], [True], [""], ["Sure"])
    with pytest.raises(SafeSteerError, match="none of the 1 harmful prompts"):
        B.dpo_examples(silent)
    with pytest.raises(SafeSteerError, match="2 prompts but 1 labels"):
        B.PairedAnswers(["a", "b"], [True], ["x", "y"], ["x", "y"])


def test_trl_sees_the_runs_prompts(run, tiny_model_dir: Path):
    """TRL formats a conversational prompt as the run does (the template's default system prompt
    included), and the prompt's ids are a prefix of the prompt + answer's."""
    _, _, a = run
    tok = load_tokenizer(str(tiny_model_dir))
    for e in B.dpo_examples(a):
        ours = tok(chat_texts(tok, [e["prompt"][0]["content"]])[0], add_special_tokens=False)["input_ids"]
        trl = tok.apply_chat_template(
            e["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
        )
        full = tok.apply_chat_template(e["prompt"] + e["chosen"], tokenize=True, return_dict=True)
        assert list(trl["input_ids"]) == ours
        assert list(full["input_ids"][: len(ours)]) == ours


def completion_logprobs(model_dir, examples: list[dict], key: str) -> list[float]:
    """Each example's summed log-probability of its ``key`` answer, and its token count, as TRL tokenizes it."""
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for e in examples:
            prompt = tok.apply_chat_template(
                e["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
            )
            full = tok.apply_chat_template(e["prompt"] + e[key], tokenize=True, return_dict=True)["input_ids"]
            k = len(prompt["input_ids"])
            ids = torch.tensor([list(full)])
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            token_lp = lp.gather(-1, ids[0, 1:, None])[:, 0]
            out.append((float(token_lp[k - 1 :].sum()), len(full) - k))
    return out


def assert_only_adapted_moved(base: Path, out: Path, targets=("q_proj.weight", "v_proj.weight")) -> None:
    """``out`` is a plain model with LoRA merged (the base model's tensor names, no adapter tensors),
    and some weights moved, all of them in the adapters' target modules."""
    wa, wb = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(wb) == set(wa)
    moved = {k for k in wa if not torch.equal(wa[k], wb[k])}
    assert moved and all(k.endswith(targets) for k in moved), moved


def weights_differ(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_train_sft(run, texts, tiny_model_dir: Path, tmp_path: Path):
    cfg, _, _ = run
    examples = B.sft_examples(texts)
    assert len(examples) == len(texts.prompts)
    out = tmp_path / "sft"
    trained = B.train_sft(cfg, str(tiny_model_dir), examples, lr=1e-3, epochs=2, out=out)
    assert trained.model_dir == out and trained.wall_seconds > 0
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]  # written atomically, no leftovers
    AutoModelForCausalLM.from_pretrained(out)
    assert load_tokenizer(str(out)).chat_template  # the tokenizer kept its chat template
    assert weights_differ(tiny_model_dir, out)
    before = completion_logprobs(tiny_model_dir, examples, "completion")
    after = completion_logprobs(out, examples, "completion")
    n_tokens = sum(n for _, n in before)
    assert trained.trained_tokens == 2 * n_tokens
    assert sum(lp for lp, _ in after) / n_tokens > sum(lp for lp, _ in before) / n_tokens
    # a fraction of an epoch: that share of the steps (rounded up) and of the tokens
    part = B.train_sft(cfg, str(tiny_model_dir), examples, lr=1e-3, epochs=0.5, out=tmp_path / "part")
    assert trained.steps % 2 == 0 and part.steps == math.ceil(trained.steps / 4) < trained.steps
    assert part.trained_tokens == round(n_tokens / 2)


def test_train_dpo(run, texts, tiny_model_dir: Path, tmp_path: Path):
    cfg, _, _ = run
    examples = B.dpo_examples(texts)
    out = tmp_path / "dpo"
    trained = B.train_dpo(cfg, str(tiny_model_dir), examples, beta=0.1, lr=1e-3, epochs=2, out=out)
    assert trained.model_dir == out and trained.wall_seconds > 0
    assert [p.name for p in tmp_path.iterdir()] == ["dpo"]
    AutoModelForCausalLM.from_pretrained(out)
    assert weights_differ(tiny_model_dir, out)

    def margin(model_dir) -> float:
        chosen = completion_logprobs(model_dir, examples, "chosen")
        rejected = completion_logprobs(model_dir, examples, "rejected")
        return sum(c - r for (c, _), (r, _) in zip(chosen, rejected)) / len(examples)

    n_tokens = sum(
        n for key in ("chosen", "rejected") for _, n in completion_logprobs(tiny_model_dir, examples, key)
    )
    assert trained.trained_tokens == 2 * n_tokens
    assert margin(out) > margin(tiny_model_dir)


def test_sft_and_dpo_with_lora(run, texts, tiny_model_dir: Path, tmp_path: Path):
    """With learner.lora.r > 0 the baselines train the learner's adapters only (DPO's reference: the
    policy with its adapters disabled, no second copy) and write a plain HF model with them merged:
    only the target modules' weights move, and each baseline still moves its objective."""
    cfg, _, _ = run
    lora = compose([*BASE, f"data.anchor='{cfg.data.anchor}'", "learner.lora.r=4", "learner.lora.alpha=8",
                    "learner.lora.target_modules=[q_proj,v_proj]"])  # fmt: skip
    sft, dpo = B.sft_examples(texts), B.dpo_examples(texts)
    out = tmp_path / "sft"
    B.train_sft(lora, str(tiny_model_dir), sft, lr=1e-2, epochs=2, out=out)
    assert_only_adapted_moved(tiny_model_dir, out)
    before = sum(lp for lp, _ in completion_logprobs(tiny_model_dir, sft, "completion"))
    assert sum(lp for lp, _ in completion_logprobs(out, sft, "completion")) > before

    out = tmp_path / "dpo"
    B.train_dpo(lora, str(tiny_model_dir), dpo, beta=0.1, lr=1e-2, epochs=2, out=out)
    assert_only_adapted_moved(tiny_model_dir, out)

    def margin(model_dir) -> float:
        chosen = completion_logprobs(model_dir, dpo, "chosen")
        rejected = completion_logprobs(model_dir, dpo, "rejected")
        return sum(c - r for (c, _), (r, _) in zip(chosen, rejected))

    assert margin(out) > margin(tiny_model_dir)
    bad = compose([*BASE, f"data.anchor='{cfg.data.anchor}'", "learner.lora.r=4",
                   "learner.lora.target_modules=[no_such_proj]"])  # fmt: skip
    with pytest.raises(SafeSteerError, match="learner.lora.target_modules"):
        B.train_sft(bad, str(tiny_model_dir), sft, lr=1e-2, epochs=1, out=tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo", "sft"]


def test_bad_settings(run, texts, tiny_model_dir: Path, tmp_path: Path):
    cfg, _, _ = run
    a = texts
    with pytest.raises(SafeSteerError, match="epochs=0"):
        B.train_sft(cfg, str(tiny_model_dir), B.sft_examples(a), lr=1e-3, epochs=0, out=tmp_path / "x")
    with pytest.raises(SafeSteerError, match="beta=0"):
        B.train_dpo(
            cfg, str(tiny_model_dir), B.dpo_examples(a), beta=0.0, lr=1e-3, epochs=1, out=tmp_path / "x"
        )
    with pytest.raises(SafeSteerError, match="needs a steering vector"):
        B.paired_answers(cfg, str(tiny_model_dir), None, MAX_NEW)
    assert not (tmp_path / "x").exists()


def test_system_prompt_teacher(run, tiny_model_dir: Path):
    """teacher.kind=system_prompt needs no vector: the teacher is the model with the safety system prompt."""
    cfg, _, _ = run
    sp = compose([*BASE, f"data.anchor='{cfg.data.anchor}'", "teacher=system_prompt"])
    a = B.paired_answers(sp, str(tiny_model_dir), None, 2)
    assert len(a.refusal) == len(a.original) == len(a.prompts) == 4 + len(ANCHORS)


def test_chat_template_kwargs_reach_trl(run, texts, tiny_model_dir: Path, tmp_path: Path):
    """With model.chat_template_kwargs, each example carries them (TRL passes an example's
    chat_template_kwargs to apply_chat_template) and SFT trains."""
    cfg, _, _ = run
    kw = compose(
        [*BASE, f"data.anchor='{cfg.data.anchor}'", "+model.chat_template_kwargs.enable_thinking=false"]
    )
    examples = B.sft_examples(texts)[:2]
    trained = B.train_sft(kw, str(tiny_model_dir), examples, lr=1e-3, epochs=1, out=tmp_path / "m")
    assert trained.trained_tokens > 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def first_token_kl(model, teacher_model, tok, prompts: list[str], sv: SteeringVector, coeff: float) -> float:
    """Mean KL(student || steered teacher) of the first answer token over ``prompts``."""
    from safesteer.core.steering import steering

    enc = tok(chat_texts(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ls = torch.log_softmax(model(**enc).logits[:, -1].float(), -1)
        with steering(teacher_model, sv.layer, sv.vector, coeff, "prompt"):
            lt = torch.log_softmax(teacher_model(**enc).logits[:, -1].float(), -1)
    return float((ls.exp() * (ls - lt)).sum(-1).mean())


def test_trl_distillation_moves_the_student_to_the_steered_teacher(run, tiny_model_dir: Path, tmp_path: Path):
    """TRL's DistillationTrainer with the steered teacher (the hook inside its teacher forward): the
    student's reverse KL to the teacher on the training prompts falls, and the model is written; with
    LoRA only the target modules' weights move (merged)."""
    from safesteer.core.steering import load_vector
    from safesteer.models import load_hf

    _, vector, a = run
    cfg = compose([*BASE, f"data.anchor='{tmp_path / 'anchors.txt'}'", "teacher.coeff=8.0", "trainer.epochs=4",
                   "trainer.max_steps=8"])  # fmt: skip
    (tmp_path / "anchors.txt").write_text("\n".join(ANCHORS) + "\n")
    sv = load_vector(vector)
    base, tok = load_hf(str(tiny_model_dir))
    harmful = [p for p, h in zip(a.prompts, a.harmful) if h]
    before = first_token_kl(base, base, tok, harmful, sv, 8.0)
    trained = B.train_distill(cfg, str(tiny_model_dir), vector, 3e-3, tmp_path / "distill")
    assert trained.trained_tokens > 0 and trained.wall_seconds > 0
    student = AutoModelForCausalLM.from_pretrained(trained.model_dir).eval()
    after = first_token_kl(student, base, tok, harmful, sv, 8.0)
    assert after < 0.7 * before, (before, after)  # measured: 0.027 -> 0.014; without the hook, no move
    assert not (tmp_path / "distill.tmp").exists()
    with pytest.raises(SafeSteerError, match="steered teacher"):
        B.train_distill(cfg, str(tiny_model_dir), None, 1e-3, tmp_path / "x")
    lora = compose([*BASE, f"data.anchor='{tmp_path / 'anchors.txt'}'", "teacher.coeff=8.0", "trainer.max_steps=2",
                    "learner.lora.r=4", "learner.lora.target_modules=[q_proj,v_proj]"])  # fmt: skip
    out = B.train_distill(lora, str(tiny_model_dir), vector, 3e-3, tmp_path / "distill-lora").model_dir
    assert_only_adapted_moved(tiny_model_dir, out)
