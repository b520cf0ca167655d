"""The rollout engine's memory on CPUs (safesteer.rollout.drop_embedding_copy), on a real vLLM CPU
engine serving the tiny random Llama: the input embedding's packed copy is dropped at start and after a
weight reload, the output layer keeps its own, and the copy comes back, with the same product, if the
embedding is ever used as a linear layer. The teacher's steering engine starts first in the same
process, as in the comparison's served baselines: engines with different worker extensions share it."""

from __future__ import annotations

from procs import child_result

# Runs in a child process (procs.child_result).
ENGINE_CHECK = r"""
import json, sys
import torch
from safetensors.torch import save
from safesteer.config import compose
from safesteer.core.generation import chat_texts
from safesteer.schema import typed
from safesteer.models import load_hf
from safesteer.rollout import RolloutWorker, drop_embedding_copy, shut_down
from safesteer.teacher import steering_engine

path = sys.argv[1]
cfg = compose(["+experiment=smoke", f"model.path={path}"])
model, tok = load_hf(path)

def state(m):
    emb, head = m.model.embed_tokens, m.lm_head
    return {
        "embedding_unpacked": getattr(emb.cpu_linear, "safesteer_unpacked", False),
        "head_unpacked": getattr(head.cpu_linear, "safesteer_unpacked", False),
        "embedding_bytes": emb.weight.numel() * emb.weight.element_size(),
    }

def use_as_linear(m):
    emb = m.model.embed_tokens
    x = torch.randn(3, emb.weight.shape[1], generator=torch.Generator().manual_seed(0))
    got = emb.cpu_linear(x, emb.weight, None)
    want = torch.nn.functional.linear(x, emb.weight)
    return {"close": bool(torch.allclose(got, want, atol=1e-4)), **state(m), "dropped_again": drop_embedding_copy(m)}

class Teacher:
    llm = steering_engine(path, typed(cfg.rollout), "float32", 0, "cpu", False, None)
teacher_start = Teacher.llm.apply_model(state)[0]
shut_down(Teacher, 1)
worker = RolloutWorker(path, typed(cfg.rollout), "float32", 0, "cpu")
prompt = tok(chat_texts(tok, ["Name three rivers."])[0], add_special_tokens=False)["input_ids"]
res = {"teacher_start": teacher_start, "start": worker.llm.apply_model(state)[0], "answer": worker.greedy([prompt], 8)[0]}
blob = save({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"})
worker.load_weights(blob, 1)  # a full reload packs the embedding again; the worker drops it again
res["reloaded"] = worker.llm.apply_model(state)[0]
res["answer_after_reload"] = worker.greedy([prompt], 8)[0]
res["linear"] = worker.llm.apply_model(use_as_linear)[0]
worker.close()
print("RESULT" + json.dumps(res))
"""


def test_the_input_embedding_s_packed_copy_is_dropped_and_comes_back_on_use(tiny_model_dir) -> None:
    res = child_result(ENGINE_CHECK, str(tiny_model_dir))
    for when in ("teacher_start", "start", "reloaded"):
        assert res[when]["embedding_unpacked"] and not res[when]["head_unpacked"], when
    assert res["answer"] and res["answer_after_reload"] == res["answer"]
    linear = res["linear"]
    # used as a linear layer, the embedding packs its weight again and computes the same product
    assert linear["close"] and not linear["embedding_unpacked"]
    assert linear["dropped_again"] == linear["embedding_bytes"] > 0
