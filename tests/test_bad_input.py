"""Bad input, one test per case: one error line naming the culprit, exit status 2, no traceback, and
nothing in the run directory that claims to be a finished artifact. (Invalid option values are in
test_cli.py, an unreachable Ray address in test_deploy.py.)"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
FINISHED = ("metrics.json", "report.md", "export", "checkpoints")


def run(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "safesteer.run", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def refused(p: subprocess.CompletedProcess, run_dir: Path, *culprits: str) -> str:
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    for c in culprits:
        assert c in errors[0], errors[0]
    for name in FINISHED:
        assert not (run_dir / name).exists(), name
    return errors[0]


class Payload:
    """Unpickling this runs code: it creates ``marker``. A loader that unpickles would leave it behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_file(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(Payload(marker)))
    return path


# -- data files --------------------------------------------------------------------------------------


def test_malformed_data_file(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"instruction": "Write a poem"}\n{"instruction": "unterminated\n')
    refused(run(tmp_path / "run", f"data.train={bad}"), tmp_path / "run", str(bad), "line 2")


def test_empty_data_file(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text("")
    refused(run(tmp_path / "run", f"data.train={bad}"), tmp_path / "run", str(bad), "empty")


def test_oversized_data_file(tmp_path):
    bad = tmp_path / "train.jsonl"
    with open(bad, "wb") as f:  # sparse: 65 MiB of nothing, over the 64 MiB limit
        f.truncate(65 * 2**20)
    refused(run(tmp_path / "run", f"data.train={bad}"), tmp_path / "run", str(bad), "over the limit")


@pytest.mark.slow
def test_prompts_longer_than_the_context_are_skipped_counted_and_reported(tmp_path):
    data = tmp_path / "train.jsonl"
    long = "Explain, step by step and at length, " + "why the sky is blue and " * 200
    short = [f"Write a short poem about the number {i}." for i in range(8)]
    data.write_text("".join(json.dumps({"instruction": x}) + "\n" for x in [long, *short]))
    run_dir = tmp_path / "run"
    p = run(run_dir, f"data.train={data}", "data.train_limit=null", "stages=[prepare,distill,export]")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipped 1 training prompts longer than model.max_prompt_tokens=128" in p.stdout + p.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["skipped_prompts"] == 1
    assert (
        "training prompts skipped (longer than model.max_prompt_tokens): 1"
        in (run_dir / "report.md").read_text()
    )


# -- the model and the steering vector ---------------------------------------------------------------


def test_unknown_model_architecture(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2)
    ).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    p = run(tmp_path / "run", f"model.path={gpt2}")
    refused(p, tmp_path / "run", "unsupported model architecture GPT2LMHeadModel", "model.model.layers")


def test_layer_index_out_of_range(tmp_path):
    p = run(tmp_path / "run", "steering.layers=[1,99]")
    refused(p, tmp_path / "run", "steering.layers=[99]", "out of range")


def test_steering_vector_width_does_not_match_the_model(tmp_path):
    import torch

    from safesteer.core.steering import SteeringVector, vector_bytes

    vec = tmp_path / "narrow.safetensors"
    vec.write_bytes(
        vector_bytes(SteeringVector(vector=torch.ones(32), layer=1, coeff=1.0, method="contrastive"))
    )
    p = run(tmp_path / "run", f"steering.vector={vec}")
    refused(p, tmp_path / "run", str(vec), "width 32", "hidden size is 64")


def test_steering_vector_built_for_a_deeper_model(tmp_path):
    import torch

    from safesteer.core.steering import SteeringVector, vector_bytes

    vec = tmp_path / "deep.safetensors"
    vec.write_bytes(
        vector_bytes(SteeringVector(vector=torch.ones(64), layer=20, coeff=1.0, method="contrastive"))
    )
    p = run(tmp_path / "run", f"steering.vector={vec}")
    refused(p, tmp_path / "run", str(vec), "steering layer 20", "4-layer model")


def test_a_model_without_a_chat_template(tmp_path, tiny_model_dir):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    p = run(tmp_path / "run", f"model.path={plain}")
    refused(p, tmp_path / "run", f"model.path={plain}", "no chat template")


def test_export_that_would_drop_an_untied_head_is_refused(tmp_path):
    """An untied model's weights without ``lm_head.weight`` (as a learner that took the model for
    tied would send them) are refused by the export, and one that claims a tie its class does not
    make is refused before anything runs."""
    from safetensors.torch import save
    from transformers import AutoTokenizer, LlamaForCausalLM

    from safesteer.errors import SafeSteerError
    from safesteer.models import (
        check_architecture,
        check_export,
        prepare_default_model,
        tiny_llama_config,
        weight_names,
    )

    tok = AutoTokenizer.from_pretrained(prepare_default_model())
    cfg = tiny_llama_config(tok, num_hidden_layers=2)
    cfg.tie_word_embeddings = False
    model = LlamaForCausalLM(cfg)
    path = tmp_path / "untied"
    model.save_pretrained(path)
    state = model.state_dict()
    check_export(
        str(path), weight_names(save({k: v.contiguous() for k, v in state.items()}))
    )  # complete: accepted
    state.pop("lm_head.weight")
    with pytest.raises(SafeSteerError, match="lack lm_head.weight; the export would drop them") as e:
        check_export(str(path), weight_names(save({k: v.contiguous() for k, v in state.items()})))
    assert "\n" not in str(e.value)
    assert check_architecture(str(path)).tie_word_embeddings is False


# -- where things are written ------------------------------------------------------------------------


def test_non_writable_output_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    p = run(blocker / "run")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"hydra.run.dir={blocker / 'run'}" in errors[0], p.stderr
    assert "not writable" in errors[0]
    assert blocker.read_text() == "not a directory\n"


# -- files that are not what they claim: never unpickled -----------------------------------------------


def test_a_pickle_given_as_steering_vector_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    vec = evil_file(tmp_path / "vector.safetensors", marker)
    p = run(tmp_path / "run", f"steering.vector={vec}")
    refused(p, tmp_path / "run", str(vec), "not a SafeSteer safetensors vector")
    assert not marker.exists()


def test_a_pickle_in_a_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    ck = tmp_path / "checkpoints" / "step-000002"
    ck.mkdir(parents=True)
    (ck / "driver.json").write_text(json.dumps({"step": 2, "history": [], "schedule": []}))
    (ck / "COMPLETE").write_text("step 2\n")
    for rank in (0, 1):
        evil_file(ck / f"learner-rank{rank}.safetensors", marker)
    run_dir = tmp_path / "run"
    p = run(run_dir, f"trainer.resume={ck}")
    refused(p, run_dir, str(ck / "learner-rank0.safetensors"), "not a safetensors file")
    assert not marker.exists()


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "checkpoints" / "step-000002"
    ck.mkdir(parents=True)
    (ck / "driver.json").write_text(json.dumps({"step": 2}))
    p = run(tmp_path / "run", f"trainer.resume={ck}")
    refused(p, tmp_path / "run", str(ck), "incomplete checkpoint (no COMPLETE marker)")


# -- config validation, property-based -----------------------------------------------------------------


@pytest.fixture(scope="module")
def base_cfg():
    from hydra import compose, initialize_config_dir

    from safesteer.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=["+experiment=smoke"])


NUMERIC = {
    "rollout.temperature": st.floats(-2, 3, allow_nan=False),
    "rollout.top_p": st.floats(-1, 2, allow_nan=False),
    "rollout.samples_per_prompt": st.integers(-3, 6),
    "learner.lr": st.floats(-1, 1, allow_nan=False),
    "learner.world_size": st.integers(-2, 4),
    "learner.micro_batch_size": st.integers(-2, 9),
    "learner.warmup_ratio": st.floats(-1, 2, allow_nan=False),
    "trainer.prompts_per_step": st.integers(-2, 9),
    "trainer.max_staleness": st.integers(-2, 4),
    "trainer.checkpoint_every": st.integers(-3, 5),
    "trainer.keep_checkpoints": st.integers(-3, 5),
    "trainer.max_restarts": st.integers(-3, 5),
    "trainer.max_bad_steps": st.integers(-3, 5),
}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_validation_accepts_or_names_the_bad_option(base_cfg, data):
    """Any mix of numeric values either validates, or fails with a SafeSteerError naming an option
    that was changed (never another exception, never an unrelated option)."""
    from omegaconf import OmegaConf

    from safesteer.config import validate
    from safesteer.errors import SafeSteerError

    cfg = OmegaConf.create(OmegaConf.to_container(base_cfg))
    keys = data.draw(st.lists(st.sampled_from(sorted(NUMERIC)), min_size=1, max_size=4, unique=True))
    for key in keys:
        OmegaConf.update(cfg, key, data.draw(NUMERIC[key], label=key))
    try:
        validate(cfg)
    except SafeSteerError as e:
        named = str(e).split(":")[0] + " " + str(e)
        assert any(k in named for k in keys), (keys, str(e))
