"""The performance benchmark: this pipeline against the single-process trainers on one workload.

``python -m safesteer.bench`` (or ``make bench``) runs, on one machine and in one invocation, each in
its own process so that peak memory per process is measurable:

- ``pipeline``: ``python -m safesteer.run stages=[distill]`` with its default settings (Ray, vLLM
  rollout, the steered teacher actor, DeepSpeed learner ranks); per-stage seconds come from its
  ``metrics.jsonl``.
- ``sequential``: the same algorithm in one process and one thread pool (:mod:`safesteer.bench.sequential`):
  HF ``generate``, the steered teacher forward, the localized loss, AdamW.
- ``trl``: TRL's ``GKDTrainer`` with ``lmbda=1`` and ``beta=1`` (on-policy, reverse KL) and the steered
  teacher (:mod:`safesteer.bench.trl_gkd`).
- ``trl_distill``: TRL's ``DistillationTrainer`` (on-policy, ``beta=1``: reverse KL), generating with
  its colocated vLLM engine, and the same steered teacher (:mod:`safesteer.bench.trl_distill`).

Every system runs a warm-up step and then the measured steps on the same prompts, samples and lengths
(training prompts only: ``trainer.anchors_per_step=0``, as the baselines have no anchor prompts);
the figure of merit is trained completion tokens per second. See ``docs/performance.md``.
"""
