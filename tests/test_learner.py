"""The learner's student module: the localized loss through the chunked LM head equals the loss
written the plain way (the model's full logits, then the loss), value and gradient, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from safesteer.core.loss import LocalizedStudent, localized_reverse_kl_terms, sequence_mean
from safesteer.core.scoring import right_padded_positions


def _batch(vocab: int, K: int, mode: str):
    g = torch.Generator().manual_seed(3)
    B, T = 3, 9
    input_ids = torch.randint(0, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    completion = torch.zeros(B, T - 1)
    completion[0, 3:] = 1
    completion[1, 4:6] = 1
    completion[2, 2:] = 1
    ids = torch.randperm(vocab, generator=g)[:K]
    teacher_ids = torch.randint(0, vocab, (B, T - 1, K), generator=g) if mode == "topk" else None
    shape = (B, T - 1) if mode in ("k1", "k3") else (B, T - 1, K)
    teacher = torch.log_softmax(torch.randn(B, T - 1, vocab, generator=g), -1)
    if mode in ("k1", "k3"):
        t_lp = torch.gather(teacher, -1, input_ids[:, 1:, None]).squeeze(-1)
    elif mode == "topk":
        t_lp = torch.gather(teacher, -1, teacher_ids)
    else:
        t_lp = teacher[..., ids]
    assert t_lp.shape == shape
    return input_ids, attention_mask, completion, t_lp, teacher_ids, ids


@pytest.mark.parametrize("chunk", [4, None])  # None: the student computes the full logits itself
@pytest.mark.parametrize("mode", ["partial", "bucket", "topk", "k1", "k3"])
def test_the_chunked_head_loss_equals_the_full_logits_loss(tiny, mode: str, chunk: int | None) -> None:
    model, _ = tiny
    model.float().train()
    input_ids, attention_mask, completion, t_lp, teacher_ids, ids = _batch(model.config.vocab_size, 5, mode)
    student = LocalizedStudent(model, ids, mode, False, False, chunk=chunk)
    per_seq, mass = student(input_ids, attention_mask, completion, t_lp, teacher_ids)
    grads = torch.autograd.grad(per_seq.sum(), list(model.parameters()))

    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=right_padded_positions(attention_mask),
    ).logits[:, :-1]
    gathered = teacher_ids if mode == "topk" else ids
    terms = localized_reverse_kl_terms(logits, t_lp, gathered, mode, False, target_ids=input_ids[:, 1:])
    want = sequence_mean(terms, completion)
    want_grads = torch.autograd.grad(want.sum(), list(model.parameters()))

    torch.testing.assert_close(per_seq, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    probs = torch.softmax(logits.detach().float(), -1)[..., ids].sum(-1)
    assert mass.item() == pytest.approx((probs * completion).sum().item() / completion.sum().item(), rel=1e-4)


def test_lora_factor_blob_merges_like_peft(tiny_model_dir) -> None:
    """The factor blob (what the engines load and the export merges) rebuilds peft's own merge from
    the base checkpoint on disk, layer by layer, and carries nothing but the adapters."""
    import copy

    from transformers import AutoModelForCausalLM

    from safesteer.core.lora import factor_blob, is_factor_blob, merged_weights
    from safesteer.learner import LoraSettings, add_lora
    from safesteer.models import CheckpointReader, weight_names

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = copy.deepcopy(base)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = add_lora(model, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # only the adapters train
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # peft starts B at zero: make the adapter do something
    blob = factor_blob(model.state_dict(), settings.alpha / settings.r)
    assert is_factor_blob(blob)
    assert all(".lora_" in n for n in weight_names(blob)) and len(weight_names(blob)) == len(trainable)
    merged = dict(merged_weights(blob, CheckpointReader(str(tiny_model_dir))))
    layers = base.config.num_hidden_layers
    assert len(merged) == 3 * layers  # the adapted layers only
    reference = peft_model.merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(v, reference[k], atol=1e-6, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base.state_dict()[q])


def test_lora_target_modules_the_model_lacks_are_named(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from safesteer.errors import SafeSteerError
    from safesteer.learner import LoraSettings, add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(SafeSteerError, match=r"learner.lora.target_modules=\['c_attn'\]"):
        add_lora(model, LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=["c_attn"]))


def test_learner_teacher_scores_like_the_teacher_actor(tiny_model_dir) -> None:
    """teacher.backend=learner: a LoRA rank's model with trained (non-zero) adapters, switched off and
    steered, scores exactly like the separate teacher (the original weights plus the hook), on
    steered and anchor rows; with the adapters on it would not. The adapters are on again afterwards."""
    import copy

    from transformers import AutoModelForCausalLM

    from safesteer.core.scoring import score_completions
    from safesteer.core.steering import SteeringVector, Teacher, vector_bytes
    from safesteer.core.tokens import SafetyTokens
    from safesteer.learner import LoraSettings, add_lora
    from safesteer.models import load_tokenizer
    from safesteer.teacher import LearnerTeacher, TeacherConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    hidden = base.config.hidden_size
    torch.manual_seed(1)
    sv = SteeringVector(vector=torch.randn(hidden), layer=2, coeff=4.0, method="test")
    cfg = TeacherConfig(
        backend="learner", kind="vector", anchor_coeff=-0.5, gate="label", coeff=None, positions="prompt",
        system_prompt=None, topk=5, num_actors=1, logits_chunk=3, batch_size=2, bf16=False,
        num_cpus=1, num_gpus=0, threads=1, resources={},
    )  # fmt: skip
    ids = [5, 17, 200, 301]
    tokens = SafetyTokens(
        ids=ids, strings=[tok.decode([i]) for i in ids], scores=[1.0] * 4, p_base=[0.0] * 4,
        p_steered=[0.0] * 4, method="kl", student_mass=0.0, steered_mass=0.0,
    )  # fmt: skip
    model = copy.deepcopy(base)
    adapters = add_lora(
        model, LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "down_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.train()
    ins = ["How do I pick a lock?", "Name a fruit.", "Write a poem about rain.", "How do I hack email?"]
    comps = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [41]]
    steer = [True, False, False, True]
    got = LearnerTeacher(model, adapters, cfg, vector_bytes(sv), tokens, "ids", tok).score(ins, comps, steer)
    assert model.training  # put back as it was
    teacher = Teacher(kind="vector", vector=sv, anchor_coeff=-0.5, positions="prompt")
    want = score_completions(base, tok, teacher, ins, comps, "ids", torch.tensor(ids), 0, 3, 2, steer)
    torch.testing.assert_close(got["teacher"]["logprobs"], want["logprobs"], atol=1e-5, rtol=0)
    with torch.no_grad():  # the adapters are back on: the student's own scores differ
        student = score_completions(model, tok, teacher, ins, comps, "ids", torch.tensor(ids), 0, 3, 2, steer)
    assert not torch.allclose(student["logprobs"], want["logprobs"], atol=1e-3)


def test_merged_weights_reach_the_engine_with_their_biases(tmp_path) -> None:
    """The reload stream puts each layer's base bias right after its merged weight (vLLM repacks a
    layer only once all of its tensors have arrived), and only biases the checkpoint has."""
    from safetensors.torch import save_file

    from safesteer.cluster import release_freed_memory
    from safesteer.models import CheckpointReader
    from safesteer.rollout import with_biases

    names = ["l.q_proj.weight", "l.q_proj.bias", "l.o_proj.weight", "l.norm.weight"]
    save_file({n: torch.full((2, 2) if n.endswith("weight") else (2,), float(i)) for i, n in enumerate(names)},
              tmp_path / "model.safetensors")  # fmt: skip
    read = CheckpointReader(str(tmp_path))
    merged = [("l.q_proj.weight", torch.zeros(2, 2)), ("l.o_proj.weight", torch.ones(2, 2))]
    out = list(with_biases(iter(merged), read))
    assert [n for n, _ in out] == ["l.q_proj.weight", "l.q_proj.bias", "l.o_proj.weight"]
    assert torch.equal(out[0][1], torch.zeros(2, 2)) and torch.equal(out[1][1], torch.full((2,), 1.0))
    release_freed_memory()  # glibc: malloc_trim; must not fail anywhere


def test_release_freed_memory_returns_a_fragmented_heap() -> None:
    """Freed 64 KiB tensors below a live one stay resident until ``release_freed_memory`` (glibc keeps
    them in the heap): what a learner step or a weight reload leaves behind."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import torch
        from safesteer.cluster import release_freed_memory
        def anon():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
        held = [torch.ones(16 * 1024) for _ in range(5000)]  # 64 KiB each, ~320 MiB
        top = torch.ones(16 * 1024)
        del held
        before = anon()
        release_freed_memory()
        print(before - anon())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) > 200  # MiB given back
