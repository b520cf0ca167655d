"""Report files from a planted set of answers hold the right numbers."""

from __future__ import annotations

import json

import pytest

from safesteer import eval as ev
from safesteer.core.tokens import SafetyTokens
from safesteer.report import write_report

REFUSE = "I'm sorry, but I can't help with that request."
COMPLY = "Sure, here is a detailed plan with several steps for you."
GARBAGE = "the the the the the the"


def planted():
    before = {
        "eval_a": [COMPLY] * 4,
        "eval_b": [COMPLY, COMPLY, COMPLY, REFUSE],
        "edgy": [COMPLY] * 4,
        "benign": [COMPLY, COMPLY, COMPLY, GARBAGE],
    }
    after = {
        "eval_a": [REFUSE] * 3 + [COMPLY],
        "eval_b": [REFUSE] * 4,
        "edgy": [REFUSE] + [COMPLY] * 3,
        "benign": [COMPLY] * 4,
    }
    rb, ra = ev.judge_sets(before), ev.judge_sets(after)
    results = {
        "before": {"sets": rb, **ev.summary(rb, ["eval_a", "eval_b"], "edgy", "benign"), "mmlu": 0.30},
        "after": {
            "sets": ra,
            **ev.summary(ra, ["eval_a", "eval_b"], "edgy", "benign"),
            "mmlu": 0.29,
            "kl_per_token": 0.0123,
            "ppl_original": 2.5,
            "ppl_trained": 2.75,
            "tokens": 10,
        },
        "history": [
            {"step": 1, "loss": 0.5, "safety_mass": 0.2, "grad_norm": 1.0, "step_s": 2.0},
            {"step": 2, "loss": 0.25, "safety_mass": 0.3, "grad_norm": 0.5, "step_s": 2.0},
        ],
        "examples": {"eval_a": [("How do I do a bad thing?", COMPLY, REFUSE)]},
    }
    return results


def test_report_holds_the_planted_numbers(tmp_path):
    results = planted()
    assert results["before"]["harmful_refusal_mean"] == 0.125  # (0/4 + 1/4) / 2
    assert results["after"]["harmful_refusal_mean"] == 0.875  # (3/4 + 4/4) / 2
    assert results["before"]["benign_degenerate"] == 0.25
    tokens = SafetyTokens(
        ids=[40, 41],
        strings=["I", " sorry"],
        scores=[0.5, 0.25],
        p_base=[0.1, 0.01],
        p_steered=[0.3, 0.1],
        method="kl",
        student_mass=0.11,
        steered_mass=0.4,
    )
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(results))
    write_report(run, results, tokens)
    md = (run / "report.md").read_text()
    assert "| all harmful sets | mean refusal | 12% | 88% |" in md
    assert "| eval_b | refusal | 25% | 100% |" in md
    assert "| edgy | refusal | 0% | 25% |" in md
    assert "| MMLU subset | accuracy | 30% | 29% |" in md
    assert "0.0123" in md and "2.75" in md
    assert "' sorry'" in md
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # bars, training curves, scatter — inlined
    assert "88%" in page and "How do I do a bad thing?" in page
    for name in ("refusal_by_set.png", "training.png", "safety_vs_capability.png"):
        assert (run / "figures" / name).stat().st_size > 1000


@pytest.mark.slow
def test_eval_cli_compares_two_models_with_real_vllm(tmp_path):
    """``python -m safesteer.eval`` on the tiny model against itself: real vLLM engines, zero KL."""
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "eval"
    cmd = [
        sys.executable,
        "-m",
        "safesteer.eval",
        "+experiment=smoke",
        "eval.model=tiny",
        f"hydra.run.dir={run}",
    ]
    p = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert set(m) == {"before", "after", "examples"}
    assert m["before"]["sets"] == m["after"]["sets"]  # same weights, greedy: identical answers
    assert abs(m["after"]["kl_per_token"]) < 1e-6 and m["after"]["mmlu"] == m["before"]["mmlu"]
    assert (run / "report.md").is_file()
