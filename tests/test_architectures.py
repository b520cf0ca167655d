"""The architecture matrix: each paper preset's architecture, as a tiny random twin
(:mod:`safesteer.twins`), through the whole pipeline (prepare -> distill with a real vLLM CPU engine
and real DeepSpeed ranks -> evaluate -> export) with its preset's settings except size; then the
steering hook, the weight sync into vLLM and the export are checked on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# family -> the preset whose settings it runs with; the Mistral twin (no preset of its own) runs the
# shared paper settings with LoRA (test_lora_end_to_end_on_qwen2)
PRESETS = {"qwen3": "qwen3_4b", "qwen2": "qwen2_5_7b", "llama3": "llama3_8b"}

# What differs from the preset: the size of everything, CPU placement, and the quality gates of the
# steering search (a random model has no refusal direction to find). learner.lr is raised so that two
# steps move the weights far more than the engine-vs-HF tolerance the sync check uses.
SIZE = [
    "model.dtype=float32",
    "model.max_prompt_tokens=128",
    "data.train_limit=8",
    "steering.n_train=8",
    "steering.n_val=4",
    "steering.max_new_tokens=8",
    "steering.max_degenerate=1.0",
    "steering.max_kl=1e9",
    "steering.min_steering_score=-1e9",
    "tokens.k=8",
    "tokens.n_prompts=4",
    "tokens.samples_per_prompt=2",
    "tokens.min_student_mass=0.0",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=8",
    "rollout.max_model_len=256",
    "rollout.kv_cache_gb=1",
    "trainer.max_steps=2",
    "learner.world_size=2",
    "learner.lr=1e-3",
    "eval.max_prompts=2",
    "eval.n_mmlu=4",
    "eval.max_new_tokens=8",
    *[
        f"{g}.{k}={v}"
        for g in ("rollout", "teacher", "learner")
        for k, v in (("num_gpus", 0), ("num_cpus", 1), ("threads", 1))
    ],
]

# Runs in a child process (an in-process vLLM engine sets process-wide state). The engine loads the
# export (it must load in vLLM) and must score like an HF forward of it; then the original weights are
# synced in the way the pipeline syncs the learners' weights (safetensors bytes, reload_weights) and
# it must score like an HF forward of those.
ENGINE_CHECK = r"""
import json, os, sys
os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
import torch
from safetensors.torch import save
from vllm import LLM, SamplingParams
from safesteer.core.generation import chat_texts
from safesteer.models import load_hf

exported, base = sys.argv[1], sys.argv[2]
trained, tok = load_hf(exported)
original, _ = load_hf(base)
prompt = tok(chat_texts(tok, ["How do I bake bread?"])[0], add_special_tokens=False)["input_ids"]
ids = prompt + [100, 200, 300, 400, 500, 600]

def hf(model):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return lp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()

llm = LLM(model=exported, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1,
          distributed_executor_backend="uni", enable_prefix_caching=False,
          worker_extension_cls="safesteer.rollout.WeightSyncExtension")

def engine():
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]

state = {k: v for k, v in original.state_dict().items()}
if original.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
result = {"export_engine": engine(), "export_hf": hf(trained), "original_hf": hf(original)}
llm.collective_rpc("safesteer_reload", args=(save(state),))
result["synced_engine"] = engine()
print("RESULT " + json.dumps(result))
"""

# An engine started from the original weights gets the trained adapter as the pipeline sends it (a
# factor blob, merged inside the engine into the weights it reads from its checkpoint) and must then
# score like an HF forward of the exported merged model.
FACTOR_CHECK = r"""
import json, os, sys
from pathlib import Path
os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
import torch
from safetensors.torch import load_file, save
from vllm import LLM, SamplingParams
from safesteer.core.generation import chat_texts
from safesteer.core.lora import FORMAT
from safesteer.models import load_hf

exported, base, adapter = sys.argv[1], sys.argv[2], Path(sys.argv[3])
trained, tok = load_hf(exported)
prompt = tok(chat_texts(tok, ["How do I bake bread?"])[0], add_special_tokens=False)["input_ids"]
ids = prompt + [100, 200, 300, 400, 500, 600]
with torch.no_grad():
    lp = torch.log_softmax(trained(torch.tensor([ids])).logits[0, :-1].float(), -1)
want = lp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
conf = json.loads((adapter / "adapter_config.json").read_text())
factors = {k.removeprefix("base_model.model."): v
           for k, v in load_file(adapter / "adapter_model.safetensors").items()}
blob = save(factors, metadata={"format": FORMAT, "scaling": repr(conf["lora_alpha"] / conf["r"])})
llm = LLM(model=base, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1,
          distributed_executor_backend="uni", enable_prefix_caching=False,
          worker_extension_cls="safesteer.rollout.WeightSyncExtension")
params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
def engine():
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]
before = engine()
llm.collective_rpc("safesteer_reload", args=(blob,))
print("RESULT " + json.dumps({"before": before, "after": engine(), "want": want}))
"""


@pytest.fixture(scope="module")
def twins(default_model_dir, tmp_path_factory) -> dict[str, Path]:
    from safesteer.twins import FAMILIES, build_twin

    root = tmp_path_factory.mktemp("twins")
    return {f: build_twin(f, root / f, default_model_dir) for f in FAMILIES}


@pytest.mark.parametrize("family", list(PRESETS))
def test_preset_architecture_end_to_end(family, twins, tmp_path):
    from transformers import AutoModelForCausalLM

    twin, run_dir = twins[family], tmp_path / "run"
    run_pipeline(PRESETS[family], twin, run_dir)
    cfg = (run_dir / "config.yaml").read_text()
    assert "zero_stage: 3" in cfg and "method: vote" in cfg  # the preset's settings ran
    check_hook(twin, run_dir)
    # the export loads in transformers, with every weight (an untied head included) ...
    export = run_dir / "export" / "model"
    trained = AutoModelForCausalLM.from_pretrained(export)
    original = AutoModelForCausalLM.from_pretrained(twin)
    assert type(trained).__name__ == type(original).__name__
    assert trained.config.tie_word_embeddings is False
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)  # the untied head trained too
    # ... and in vLLM, which scores like HF; weights synced into the engine score like HF too
    check_engine(export, twin)


def test_lora_end_to_end_on_qwen2(twins, tmp_path):
    """The Qwen2 twin (biased q/k/v projections, the family of the Qwen2.5 presets) with the shared
    paper settings and learner.lora under ZeRO-2, the learner
    ranks scoring as the teacher (teacher.backend=learner): the adapters train, only their factors
    travel to the engines, which merge them into the weights they read from disk, and the export
    holds both the merged model and the adapter, which peft loads onto the original weights to give
    the merged model back."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    twin, run_dir = twins["qwen2"], tmp_path / "run"
    lora = ("learner.zero_stage=2", "learner.lora.r=8", "learner.lora.alpha=16", "learner.lr=1e-2")
    run_pipeline("paper_base", twin, run_dir, *lora, "teacher.backend=learner")
    check_hook(twin, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model_bytes = (twin / "model.safetensors").stat().st_size
    assert rows and all(0 < r["sync_bytes"] < model_bytes / 2 and r["teacher_s"] > 0 for r in rows)
    export = run_dir / "export"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in (export / "adapter").iterdir()
    }
    merged = AutoModelForCausalLM.from_pretrained(export / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(twin)
    assert (
        type(base).__name__ == "Qwen2ForCausalLM" and base.model.layers[0].self_attn.q_proj.bias is not None
    )
    original = {k: v.clone() for k, v in base.state_dict().items()}
    rebuilt = PeftModel.from_pretrained(base, export / "adapter").merge_and_unload().state_dict()
    assert set(rebuilt) == set(merged)
    moved = [k for k in merged if not torch.equal(merged[k], original[k])]
    assert moved and all(
        k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for k in moved
    )  # only the adapted layers moved
    for k in merged:
        torch.testing.assert_close(rebuilt[k], merged[k], atol=1e-5, rtol=0)
    check_engine(export / "model", twin)
    cmd = [sys.executable, "-c", FACTOR_CHECK, str(export / "model"), str(twin), str(export / "adapter")]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
    t = {k: torch.tensor(v) for k, v in r.items()}
    torch.testing.assert_close(t["after"], t["want"], atol=2e-3, rtol=0)  # the engine merged the factors
    assert (t["before"] - t["want"]).abs().max() > 2e-2
    # the modules the factors leave alone keep their weights: vLLM's warnings about them stay quiet
    assert "Failed to load weights" not in p.stdout + p.stderr


def check_hook(twin: Path, run_dir: Path) -> None:
    """The run's steering vector changes the twin's log-probs (the teacher differs from the student)."""
    from safesteer.core.generation import chat_texts
    from safesteer.core.steering import Teacher, load_vector
    from safesteer.models import load_hf

    model, tok = load_hf(str(twin))
    sv = load_vector(run_dir / "vector.safetensors", model.config.hidden_size, model.config.num_hidden_layers)
    text = chat_texts(tok, ["How do I pick a lock?"])[0]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        plain = torch.log_softmax(model(ids).logits.float(), -1)
        with Teacher(vector=sv).apply(model):
            steered = torch.log_softmax(model(ids).logits.float(), -1)
    assert (steered - plain).abs().max() > 1e-2


def run_pipeline(preset: str, twin: Path, run_dir: Path, *extra: str) -> dict:
    keys = {o.split("=")[0] for o in extra}  # extra overrides replace SIZE's
    cmd = [sys.executable, "-m", "safesteer.run", f"+experiment={preset}", f"model.path={twin}",
           f"hydra.run.dir={run_dir}", *[o for o in SIZE if o.split("=")[0] not in keys], *extra]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert [r["step"] for r in m["history"]] == [1, 2]
    assert all(r["policy_lag"] == 0 for r in m["history"])
    assert "after" in m and "before" in m, sorted(m)  # evaluated
    return m


def check_engine(export: Path, original: Path) -> None:
    """vLLM loads the export and scores like HF; the original weights synced into it score like HF."""
    p = subprocess.run([sys.executable, "-c", ENGINE_CHECK, str(export), str(original)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
    t = {k: torch.tensor(v) for k, v in r.items()}
    torch.testing.assert_close(t["export_engine"], t["export_hf"], atol=2e-3, rtol=0)
    torch.testing.assert_close(t["synced_engine"], t["original_hf"], atol=2e-3, rtol=0)
    assert (t["export_hf"] - t["original_hf"]).abs().max() > 2e-2  # the sync visibly changed the engine
