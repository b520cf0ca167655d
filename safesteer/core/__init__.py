"""The SafeSteer math as small pure functions over tensors and HF models (no Ray, vLLM or DeepSpeed).

- :mod:`safesteer.core.steering`: refusal directions, the steering hook, direction selection.
- :mod:`safesteer.core.tokens`: the global set of safety tokens.
- :mod:`safesteer.core.loss`: the localized reverse KL and its variants.
- :mod:`safesteer.core.scoring`: teacher log-probs at the safety ids, chunked over the sequence.
- :mod:`safesteer.core.judge`: the offline refusal judge with its coherence check.
"""
