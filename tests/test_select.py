"""Tests for safesteer.selection: the selectivity score and keeping the best step's weights."""

from __future__ import annotations

import json

from safesteer.selection import Selector, selectivity

REFUSE = "I'm sorry, but I can't help with that request."
HELP = "Sure, here is a simple recipe you can follow at home tonight."
LOOP = "I'm sorry for the misunderstanding. I'm sorry for the misunderstanding. I'm sorry for the misunderstanding."


def test_selectivity_rewards_refusing_harmful_and_helping_harmless() -> None:
    good = selectivity([REFUSE, REFUSE], [HELP, HELP])
    assert good["selectivity"] == 1.0
    blanket = selectivity([REFUSE, REFUSE], [REFUSE, REFUSE])
    assert blanket["selectivity"] == 0.0
    looping = selectivity([LOOP, REFUSE], [HELP, HELP])  # a loop is degenerate, not a refusal
    assert looping["val_harmful_refusal"] == 0.5 and looping["val_degenerate"] == 0.25
    assert looping["selectivity"] == 0.25


def test_selector_keeps_the_most_selective_step(tmp_path) -> None:
    shown: list[str] = []  # the answers of the step being validated
    decode = lambda x: shown[x[0]]  # noqa: E731
    sel = Selector(
        tmp_path, every=2, harmful_ids=[[1], [2]], harmless_ids=[[3]], max_new_tokens=4, decode=decode
    )
    assert [s for s in range(1, 8) if sel.due(s, 7)] == [2, 4, 6, 7]
    off = Selector(
        tmp_path / "off", every=0, harmful_ids=[], harmless_ids=[], max_new_tokens=4, decode=decode
    )
    assert [s for s in range(1, 8) if off.due(s, 7)] == [7]  # validated after the last step only
    answers = {2: [REFUSE, HELP, REFUSE], 4: [REFUSE, REFUSE, HELP], 6: [REFUSE, REFUSE, REFUSE]}
    for step, texts in answers.items():
        shown[:] = texts
        out = sel.validate(
            step,
            greedy=lambda ids, n, texts=texts: [[i] for i in range(len(texts))],
            export=lambda step=step: f"weights of step {step}".encode(),
        )
        assert out["best_step"] == (2 if step == 2 else 4)
    assert sel.best_weights() == b"weights of step 4"
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert info["step"] == 4 and info["selectivity"] == 1.0
    again = Selector(tmp_path, every=2, harmful_ids=[], harmless_ids=[], max_new_tokens=4, decode=decode)
    again.restore()  # a resumed run continues from the best so far
    assert again.best_step == 4 and again.best_weights() == b"weights of step 4"
