"""The distributed pipeline for real: Ray actors, vLLM CPU engines and DeepSpeed ranks (gloo), on the
``smoke`` preset's tiny random model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def run_cli(run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "safesteer.run", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ZeRO-2 here; ZeRO-3 runs end to end in tests/test_architectures.py (every paper preset uses it)
@pytest.mark.parametrize("zero_stage", [2])
def test_end_to_end_two_ranks_two_rollout_workers(tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    p = run_cli(run_dir, f"learner.zero_stage={zero_stage}", "rollout.num_workers=2", "learner.world_size=2")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["policy_lag"] == 0 for r in rows)
    for name in (
        "config.yaml",
        "vector.safetensors",
        "safety_tokens.json",
        "metrics.json",
        "report.md",
        "answers.jsonl",
        "export/model/model.safetensors",
        "export/model/config.json",
        "export/model/tokenizer.json",
        "export/vector.safetensors",
        "export/safety_tokens.json",
    ):
        assert (run_dir / name).is_file(), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model")
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((run_dir / "metrics.json").read_text())["prepare"]["model"]
    )
    changed = [
        n
        for (n, p1), (_, p0) in zip(model.named_parameters(), base.named_parameters())
        if not torch.equal(p1, p0)
    ]
    assert changed, "training did not change any weight"


def test_max_staleness_one_overlaps_with_bounded_lag(tmp_path):
    run_dir = tmp_path / "run"
    p = run_cli(
        run_dir, "trainer.max_staleness=1", "trainer.max_steps=3", "data.train_limit=12", "eval.enabled=false"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # same number of updates
    lags = [r["policy_lag"] for r in rows]
    assert max(lags) <= 1 and lags[0] == 0 and 1 in lags, lags


def test_harm_gated_teacher_prompt_steering_and_model_selection(tmp_path):
    """teacher.gate=probe: the prepare stage builds the harm probe into vector.safetensors and the
    teacher steers the prompts it flags (labels unused); teacher.positions=prompt; validation every
    step keeps the most selective weights, which are the ones exported."""
    from safesteer.core.steering import load_vector

    run_dir = tmp_path / "run"
    p = run_cli(
        run_dir,
        "teacher.gate=probe",
        "probe.depth=[0.25,0.75]",
        "teacher.positions=prompt",
        "trainer.select.every=1",
        "trainer.select.max_new_tokens=4",
        "trainer.max_steps=3",
        "data.train_limit=12",
        "learner.train_from_layer=2",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    sv = load_vector(run_dir / "vector.safetensors")
    assert sv.probe is not None and sv.probe.layer in (1, 3)
    assert 0.0 <= sv.probe.metrics["auroc"] <= 1.0
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the probe's verdicts on training and anchor sequences, and a validation per step
        assert 0.0 <= r["gate_steered_train"] <= 1.0 and 0.0 <= r["gate_steered_anchor"] <= 1.0
        assert {"selectivity", "val_harmful_refusal", "val_harmless_refusal", "best_step"} <= set(r)
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["selectivity"] == max(r["selectivity"] for r in rows)
    assert best["step"] == rows[-1]["best_step"]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["selected_step"] == best["step"] and m["validation"]["step"] == best["step"]  # the exported step
    exported = (run_dir / "export" / "model" / "model.safetensors").read_bytes()
    assert exported == (run_dir / "best" / "model.safetensors").read_bytes()
    assert (run_dir / "validation_answers.jsonl").is_file()
    # the probe sets are fitting sets of this run: the held-out report names them where they clash
    assert m["held_out"]["eval_coding"] == []
    # learner.train_from_layer=2: the embeddings and blocks 0-1 did not move, the rest did
    from transformers import AutoModelForCausalLM

    trained = dict(AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(m["prepare"]["model"]).named_parameters())
    same = {n for n in base if torch.equal(base[n], trained[n])}
    assert "model.embed_tokens.weight" in same and all(
        n in same for n in base if n.startswith("model.layers.1.")
    )
    assert any(n.startswith("model.layers.3.") and n not in same for n in base)  # the last block


# ---------------------------------------------------------------------- in-process worker groups
@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Prepared artifacts + live worker groups on the smoke preset (2 learner ranks, 2 rollout workers)."""
    import ray
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from safesteer.cluster import connect
    from safesteer.config import CONF_DIR, validate
    from safesteer.core.tokens import SafetyTokens
    from safesteer.models import resolve_model_path
    from safesteer.prepare import prepare
    from safesteer.schema import typed
    from safesteer.workers import Workers, roles

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "+experiment=smoke",
                "rollout.num_workers=2",
                "learner.lr=1e-3",
                "trainer.max_steps=4",
                "trainer.anchors_per_step=0",  # the fixed batches below are prompts_per_step prompts
            ],
        )
    validate(cfg)
    out = tmp_path_factory.mktemp("prep")
    model_path = resolve_model_path(cfg.model.path)
    prepared = prepare(cfg, out, model_path)
    st = SafetyTokens.load(prepared.tokens_path)
    connect(typed(cfg.cluster), roles(cfg), {})
    w = Workers(cfg, model_path, prepared.vector_path.read_bytes(), st, 8, "cpu")
    w.wait_ready()
    tok = AutoTokenizer.from_pretrained(model_path)
    yield {
        "cfg": cfg,
        "workers": w,
        "tok": tok,
        "model_path": model_path,
        "prepared": prepared,
        "ids": st.ids,
    }
    w.shutdown()
    ray.shutdown()


def test_teacher_and_learners_confirm_the_drivers_safety_tokens(group):
    from safesteer.errors import SafeSteerError

    w = group["workers"]
    w.wait_ready()  # every actor holds the driver's set (the fixture's check, again)
    tokens = w.tokens
    try:
        w.tokens = dataclasses.replace(tokens, ids=list(reversed(tokens.ids)))  # another K order
        with pytest.raises(SafeSteerError, match="the actors hold different safety tokens"):
            w.wait_ready()
    finally:
        w.tokens = tokens


def test_teacher_is_measured_on_every_evaluation_set(group):
    from safesteer.prepare import measure_teacher

    cfg = group["cfg"]
    rates = measure_teacher(cfg, group["prepared"], group["model_path"], n=2, max_new_tokens=4)
    assert list(rates) == [*cfg.eval.harmful_sets, *cfg.eval.edgy_sets]
    assert all(r["n"] == 2 and 0 <= r["refusal"] <= 1 for r in rates.values()), rates


def _fixed_batch(g, n_prompts=4):
    from safesteer.core.batch import collate, to_sequence_positions
    from safesteer.core.generation import chat_texts
    from safesteer.data import load_prompts

    tok, w = g["tok"], g["workers"]
    ins = [p.instruction for p in load_prompts("train_harmful", limit=n_prompts)]
    pids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, ins)]
    k = g["cfg"].rollout.samples_per_prompt
    ro = w.collect(*w.generate(1, pids, [[1000 * i + j for j in range(k)] for i in range(len(pids))]))
    comps = ro.completions
    ins_rep = [i for i in ins for _ in range(k)]
    sc = w.score(1, ins_rep, comps, [True] * len(comps))
    batch = collate([p for p in pids for _ in range(k)], comps, tok.pad_token_id)
    L = batch["input_ids"].shape[1]
    batch["teacher_logprobs"] = to_sequence_positions(
        sc.teacher["logprobs"], batch["prompt_lens"], batch["completion_lens"], L
    )
    return ins_rep, comps, sc, batch


def test_teacher_actor_matches_direct_computation(group):
    from safesteer.core.batch import collate, completion_slice
    from safesteer.core.generation import chat_texts
    from safesteer.core.scoring import score_completions
    from safesteer.core.steering import Teacher, load_vector
    from safesteer.models import load_hf

    ins, comps, sc, _ = _fixed_batch(group)
    lp = sc.teacher["logprobs"]
    K = len(group["ids"])
    assert lp.shape == (len(comps), max(len(c) for c in comps), K)
    model, tok = load_hf(group["model_path"])
    tc = group["cfg"]["teacher"]  # the run's teacher: its coefficient and steered positions
    teacher = Teacher(
        kind="vector",
        vector=load_vector(group["prepared"].vector_path),
        coeff=tc["coeff"],
        positions=tc["positions"],
    )
    ids = torch.tensor(group["ids"])
    direct = score_completions(model, tok, teacher, ins, comps, "ids", ids)["logprobs"]
    torch.testing.assert_close(lp, direct, atol=1e-4, rtol=1e-4)
    # and the steering hook is really applied: the original model's scores differ
    plain = score_completions(model, tok, teacher, ins, comps, "ids", ids, steer=[False] * len(comps))
    assert not torch.allclose(lp, plain["logprobs"], atol=1e-4)
    with torch.no_grad():  # steer=False is exactly the original model, no hook, no system prompt
        b = collate(
            [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, ins[:1])], comps[:1], 0
        )
        ref = torch.log_softmax(model(input_ids=b["input_ids"]).logits[0, :-1].float(), -1)[:, ids]
    n = len(comps[0])
    torch.testing.assert_close(
        plain["logprobs"][0, :n],
        completion_slice(ref[None], b["prompt_lens"], b["completion_lens"])[0],
        atol=1e-4,
        rtol=1e-4,
    )
    # mixed flags through the actor (conditional steering: anchors get the vector at teacher.anchor_coeff)
    anchor_coeff = group["cfg"].teacher.anchor_coeff
    assert anchor_coeff != 0  # the defaults steer the anchors' teacher away from refusal
    away = dataclasses.replace(teacher, anchor_coeff=anchor_coeff)
    anchored = score_completions(model, tok, away, ins, comps, "ids", ids, steer=[False] * len(comps))
    assert not torch.allclose(anchored["logprobs"], plain["logprobs"], atol=1e-4)
    steer = [i % 2 == 0 for i in range(len(comps))]
    mixed = group["workers"].score(1, ins, comps, steer).teacher["logprobs"]
    for i, s in enumerate(steer):
        want = direct[i] if s else anchored["logprobs"][i]
        torch.testing.assert_close(mixed[i], want, atol=1e-4, rtol=1e-4)


def test_rollout_weights_equal_learner_weights_after_a_step(group):
    import ray

    from safesteer.models import load_hf

    w = group["workers"]
    _, _, _, batch = _fixed_batch(group)
    w.train_step(1, batch)
    sync = w.sync(version=1)
    blob = w.export(w.dtype)
    digest = hashlib.sha256(blob).hexdigest()
    infos = ray.get([r.info.remote() for r in w.rollout])
    assert [i["weights_sha256"] for i in infos] == [digest] * len(w.rollout) == sync.sha256
    assert all(i["version"] == 1 for i in infos)
    # functional check: the engine's sampled-token log-probs equal an HF forward of the learners' weights
    from safetensors.torch import load

    model, tok = load_hf(group["model_path"])
    sd = load(blob)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    prompt = tok("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
        "input_ids"
    ]
    res = ray.get(w.rollout[0].generate.remote([prompt], 1, 1.0, 1.0, 6, [[7]]))
    s = res["samples"][0]
    ids = torch.tensor([prompt + s["completion_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    hf = lp.gather(-1, torch.tensor(s["completion_ids"]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(s["logprobs"]), hf, atol=2e-3, rtol=0)


def test_a_batch_of_the_wrong_size_is_refused_not_split_into_extra_optimizer_steps(group):
    from safesteer.core.batch import split

    _, _, _, batch = _fixed_batch(group)
    half = split(batch, 2)[0]
    with pytest.raises(Exception, match="micro-batches, but the engine was built for"):
        group["workers"].train_step(1, half)


def test_sequences_weighted_zero_do_not_train(group):
    """trainer.anchor_weight reaches the loss: sequences of weight 0 give no gradient at all."""
    _, _, _, batch = _fixed_batch(group)
    n = batch["input_ids"].shape[0]
    batch["weight"] = torch.zeros(n)
    zero = group["workers"].train_step(1, batch)
    assert zero.loss > 0 and zero.grad_norm == 0, zero  # the loss is reported, not trained on
    batch["weight"] = torch.tensor([0.0] * (n - 1) + [1.0])
    assert group["workers"].train_step(1, batch).grad_norm > 0


def test_loss_decreases_on_a_fixed_batch(group):
    w = group["workers"]
    _, _, _, batch = _fixed_batch(group)
    losses = [w.train_step(1, batch).loss for _ in range(4)]
    assert losses[-1] < losses[0], losses
