"""Batch assembly and the merge of the actors' shards: pure functions, no Ray."""

import torch

from safesteer.core.batch import assemble, collate, completion_slice, interleave, merge_teacher_shards


def test_interleave_inverts_round_robin_dealing():
    items = list(range(11))
    for workers in (1, 2, 3, 4):
        shards = [items[w::workers] for w in range(workers)]
        assert interleave(shards) == items
        assert interleave(shards, len(items)) == items


def test_teacher_shards_merge_back_into_batch_order_padded_to_the_longest():
    B, K = 5, 3
    full = torch.arange(B * 4 * K, dtype=torch.float32).reshape(B, 4, K) + 1
    lens = [4, 2, 3, 1, 2]
    for b, n in enumerate(lens):
        full[b, n:] = 0
    shards = []
    for w in range(2):  # each teacher's output is padded only to its own longest completion
        rows = full[w::2]
        C = max(lens[w::2])
        shards.append({"logprobs": rows[:, :C].clone(), "ids": rows[:, :C].long()})
    merged = merge_teacher_shards(shards, B)
    assert torch.equal(merged["logprobs"], full) and merged["ids"].dtype == torch.long
    assert torch.equal(merged["ids"], full.long())


def test_assemble_places_teacher_outputs_at_sequence_positions_with_anchor_weights():
    prompts = [[1, 2, 3], [4, 5]]
    comps = [[6, 7], [8, 9, 10]]
    K = 2
    C = 3
    teacher = {"logprobs": torch.randn(2, C, K)}
    teacher["logprobs"][0, 2:] = 0  # padding beyond the first completion
    batch = assemble(prompts, comps, [True, False], teacher, pad_id=0, anchor_weight=0.25)
    ref = collate(prompts, comps, 0)
    for key in ref:
        assert torch.equal(batch[key], ref[key]), key
    assert batch["anchor"].tolist() == [0.0, 1.0] and batch["weight"].tolist() == [1.0, 0.25]
    assert "teacher_ids" not in batch
    # back to completion positions, the teacher's values are where they were
    back = completion_slice(batch["teacher_logprobs"], batch["prompt_lens"], batch["completion_lens"])
    assert torch.equal(back, teacher["logprobs"])
    # and they sit where completion_mask marks the completion
    assert torch.equal(batch["teacher_logprobs"].abs().sum(-1) > 0, batch["completion_mask"] > 0)
