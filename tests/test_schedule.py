"""The driver's data order: seeded training steps plus the harmless anchor prompts of each step."""

from __future__ import annotations

from collections import Counter

import pytest

from safesteer.config import compose, validate
from safesteer.data.training import schedule
from safesteer.errors import SafeSteerError

# The schedule's mechanics on round numbers: 10 training prompts per step, whole epochs.
ROUND = ("trainer.prompts_per_step=10", "trainer.max_steps=null")


def config(*overrides: str):
    return compose([*ROUND, *overrides], check=False)


def defaults(*overrides: str):
    return compose(list(overrides), check=False)


def test_training_prompts_each_once_per_epoch_without_anchors():
    cfg = config("trainer.anchors_per_step=0", "trainer.epochs=2")
    steps = schedule(100, cfg, n_anchors=128)
    assert len(steps) == 20 and all(len(s) == 10 for s in steps)
    for epoch in (steps[:10], steps[10:]):
        assert sorted(i for s in epoch for i in s) == list(range(100))
    assert steps[0] != steps[10]  # reshuffled per epoch


def test_anchors_follow_the_training_prompts_and_cycle_evenly():
    cfg = config("trainer.anchors_per_step=5")
    n, m = 100, 12
    steps = schedule(n, cfg, n_anchors=m)
    plain = schedule(n, config("trainer.anchors_per_step=0"))
    assert len(steps) == len(plain) == 10
    for s, p in zip(steps, plain):
        assert s[:10] == p  # the training order is unchanged by anchors
        anchors = s[10:]
        assert len(anchors) == 5 and all(n <= a < n + m for a in anchors)
        assert len(set(anchors)) == 5
    counts = Counter(a for s in steps for a in s[10:])
    assert set(counts) == set(range(n, n + m))  # 50 draws over 12 anchors: every one used
    assert max(counts.values()) - min(counts.values()) <= 1
    # seeded: the same seed gives the same order, another seed another one
    assert [s for s in schedule(n, cfg, n_anchors=m)] == [s for s in steps]
    other = schedule(n, config("trainer.anchors_per_step=5", "seed=1"), n_anchors=m)
    assert [s[10:] for s in other] != [s[10:] for s in steps]


def test_no_anchor_set_means_no_anchors():
    steps = schedule(100, config("trainer.anchors_per_step=5"), n_anchors=0)
    assert all(len(s) == 10 for s in steps)


def test_anchor_settings_are_validated():
    with pytest.raises(SafeSteerError, match="trainer.anchors_per_step"):
        validate(config("trainer.anchors_per_step=-1"))
    with pytest.raises(SafeSteerError, match="trainer.anchor_weight=-0.5: must be >= 0"):
        validate(config("trainer.anchor_weight=-0.5"))
    validate(
        config("trainer.anchors_per_step=2")
    )  # (10 + 2) prompts x 2 samples = 24 sequences, 2 ranks x 2 x 6
    # (10 + 4) prompts x 2 samples = 28 sequences do not split over 2 ranks x micro-batches of 5
    five = "learner.micro_batch_size=5"
    with pytest.raises(SafeSteerError, match="anchors_per_step") as e:
        validate(config("trainer.anchors_per_step=4", five))
    assert "28 sequences" in str(e.value)
    validate(config("trainer.anchors_per_step=4", "data.anchor=null", five))  # no anchor set: 20 sequences
    validate(config("trainer.anchors_per_step=10", five))
    validate(config("+experiment=reference"))  # no anchors: 20 sequences over 2 ranks x 2 x 5


def test_anchor_coeff_is_validated():
    validate(defaults("teacher.anchor_coeff=-0.3"))
    validate(defaults("teacher=system_prompt"))  # that teacher has no vector: anchor_coeff 0 there
    with pytest.raises(SafeSteerError, match="teacher.anchor_coeff=abc: must be a number"):
        validate(defaults("teacher.anchor_coeff=abc"))
    validate(defaults("teacher.kind=system_prompt"))  # ignored there: that teacher has no vector


def test_paired_anchors_come_first_then_the_cycle() -> None:
    cfg = config("trainer.anchors_per_step=3", "trainer.prompts_per_step=4")
    pairs = {i: 50 - i for i in range(0, 100, 2)}  # even training prompts have a pair
    steps = schedule(100, cfg, n_anchors=60, pairs=pairs)
    plain = schedule(100, cfg, n_anchors=60)
    for st, pl in zip(steps, plain):
        train, anchors = st[:4], [j - 100 for j in st[4:]]
        assert train == pl[:4] and len(anchors) == 3 and len(set(anchors)) == 3
        want = [pairs[p] for p in train if p in pairs][:3]
        assert anchors[: len(want)] == want


def test_anchor_pairs_match_one_to_one_categories() -> None:
    from safesteer.data import Prompt, load_prompts
    from safesteer.data.training import anchor_pairs

    train = load_prompts("train_harmful_questions")
    anchors = load_prompts("anchor_edgy") + load_prompts("anchor_benign_questions")
    pairs = anchor_pairs(train, anchors)
    assert len(pairs) == 100
    for i, j in pairs.items():
        assert train[i].category == anchors[j].category and j >= 70
    dup = [Prompt("a", "x"), Prompt("b", "x"), Prompt("c", "y")]
    assert anchor_pairs(dup, [Prompt("d", "x"), Prompt("e", "y")]) == {2: 1}  # "x" is not one-to-one
