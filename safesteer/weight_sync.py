"""Weight sync from the learner group to the rollout engines over NCCL (GPU clusters).

``rollout.weight_sync=nccl`` replaces the default object-store path (safetensors bytes, put once
in Ray's object store and reloaded in place by every engine) with vLLM 0.32's weight-transfer API:
learner rank 0 opens an NCCL group with every rollout engine's GPU workers and broadcasts the
weights parameter by parameter (ZeRO-3 parameters are gathered one at a time on all ranks), while
each engine receives them with ``update_weights`` inside its ``start_weight_update`` /
``finish_weight_update`` session.

Written against vLLM 0.32's ``vllm.distributed.weight_transfer`` (``NCCLTrainerWeightTransferEngine``,
``WeightSource``, the worker-side ``init_weight_transfer_engine`` / ``update_weights`` RPCs). It
needs CUDA on both sides and has not been run on a GPU in this repository's test suite, which runs
on CPU machines; the object-store path is the tested one (``tests/test_pipeline.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import ray
import torch


def rollout_transfer_config() -> dict:
    """The ``weight_transfer_config`` for a rollout engine that receives over NCCL."""
    return {"backend": "nccl"}


class RolloutClient:
    """``VLLMWeightSyncClient`` over Ray handles of :class:`safesteer.rollout.RolloutWorker` actors.

    Each engine's GPU workers get their own NCCL ranks: engine ``i`` starts at rank ``1 + i * tp``.
    """

    def __init__(self, handles: Sequence, tensor_parallel_size: int):
        self.handles, self.tp = list(handles), tensor_parallel_size

    def _all(self, method: str, per_engine: Sequence | None = None, *args) -> None:
        calls = []
        for i, h in enumerate(self.handles):
            a = (per_engine[i],) if per_engine is not None else args
            calls.append(h.transfer.remote(method, *a))
        ray.get(calls)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        infos = [
            {**init_info, "rank_offset": int(init_info["rank_offset"]) + i * self.tp}
            for i in range(len(self.handles))
        ]
        self._all("init_weight_transfer_engine", infos)

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._all("update_weights", None, update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")


def zero_source(module: torch.nn.Module, zero_stage: int, dtype: torch.dtype, skip: Sequence[str] = ()):
    """A vLLM ``WeightSource`` over a DeepSpeed module (full shapes; ZeRO-3 gathered per parameter)."""
    from vllm.distributed.weight_transfer.base import (  # heavy: only the engine processes need vLLM
        ParamMeta,
        WeightSource,
    )

    class ZeroSource(WeightSource):
        def _params(self):
            return [(n, p) for n, p in module.named_parameters() if n not in skip]

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(n, dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self._params()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, p in self._params():
                if zero_stage == 3:
                    import deepspeed  # heavy: only the learner ranks need it

                    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                        yield name, p.detach().to(dtype).contiguous()
                else:
                    yield name, p.detach().to(dtype).contiguous()

    return ZeroSource()


def trainer_engine(rank: int, master_addr: str, master_port: int, n_engines: int, tp: int, client, source):
    """Open the trainer side (rank 0 sends; other ranks only join ZeRO-3 gathers)."""
    from vllm.distributed.weight_transfer.nccl_engine import (  # heavy: only the engine processes need vLLM
        NCCLTrainerInitInfo,
        NCCLTrainerWeightTransferEngine,
    )

    info = NCCLTrainerInitInfo(
        master_address=master_addr, master_port=master_port, world_size=1 + n_engines * tp, rank=rank
    )
    return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
