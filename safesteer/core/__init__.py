"""The SafeSteer math as small pure functions over tensors and HF models (no Ray, vLLM or DeepSpeed).

- :mod:`safesteer.core.steering`: the steering vector, the residual-stream hook, the teacher.
- :mod:`safesteer.core.search`: candidate refusal directions and the layer/coefficient search.
- :mod:`safesteer.core.generation`: chat prompts and batched generation.
- :mod:`safesteer.core.tokens`: the global set of safety tokens (accumulate, rank, package).
- :mod:`safesteer.core.loss`: the localized reverse KL and its variants.
- :mod:`safesteer.core.scoring`: teacher log-probs at the safety ids, chunked over the sequence.
- :mod:`safesteer.core.batch`: on-policy batches, their assembly and the merge of actor shards.
- :mod:`safesteer.core.probe`: the harm probe that can gate the teacher.
- :mod:`safesteer.core.judge`: the offline refusal judge with its coherence check.
"""
