"""Baseline (c): TRL's GKD trainer on the same model, prompts, samples, lengths and steps.

``GKDTrainer`` with ``lmbda=1`` (every batch is the student's own sampled completions) and ``beta=1``
(its generalized JSD is then the reverse KL, KL(student || teacher), over the full vocabulary). The
teacher is the student's initial weights with the steering hook applied for the whole run, so TRL's
teacher forward is the steered model. Prompts are the pipeline's chat-formatted token ids, each
repeated ``rollout.samples_per_prompt`` times, in the order of the pipeline's step schedule; a step has
the same number of sequences as a pipeline step. Optimizer and schedule are the learner's (AdamW,
cosine with warmup, same clipping); bf16 mixed precision as the learner's autocast; no gradient
checkpointing (TRL's default turns it on, which would also switch off the KV cache in generation).
The set-up, training arguments, step clock and result are shared with the other TRL baseline
(:mod:`safesteer.bench.trl_distill`) in :func:`safesteer.bench.common.run_trl`.

``python -m safesteer.bench.trl_gkd SPEC.json`` (the runner writes the spec).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from torch.utils.data import SequentialSampler

from safesteer.bench.common import TrlWorkload, run_trl  # noqa: E402


def gkd_classes():
    """``(GKDConfig, GKDTrainer)`` wherever this TRL version keeps them."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # optional: the TRL baselines only
    except ImportError:
        from trl import GKDConfig, GKDTrainer  # optional: the TRL baselines only
    return GKDConfig, GKDTrainer


def build(w: TrlWorkload, args: dict):
    """GKD (lmbda=1, beta=1) counting tokens and generation seconds, its config, the dataset."""
    from datasets import Dataset  # optional: the TRL baselines only

    GKDConfig, GKDTrainer = gkd_classes()
    eos = w.tok.eos_token_id
    rows = []
    for i in w.order:
        p = w.prompt_ids[i]
        # one placeholder completion token: GKD replaces it by the student's own samples (lmbda=1)
        rows.append(
            {
                "prompt": w.texts[i],
                "input_ids": p + [eos],
                "attention_mask": [1] * (len(p) + 1),
                "completion_mask": [0] * len(p) + [1],
            }
        )

    class MeasuredGKD(GKDTrainer):
        """GKD as is, plus counters: completion tokens entering the loss and generation seconds."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # the pipeline's step order

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            with w.generating(self.state.global_step + 1):
                return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

        def compute_loss(self, model, inputs, *args, **kwargs):
            w.add("tokens", self.state.global_step + 1, int((inputs["labels"][:, 1:] != -100).sum().item()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    r = w.cfg.rollout
    config = GKDConfig(lmbda=1.0, beta=1.0, max_new_tokens=int(r.max_new_tokens), **args)
    return MeasuredGKD, config, Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> int:
    return run_trl(argv, "trl", build)


if __name__ == "__main__":
    raise SystemExit(main())
