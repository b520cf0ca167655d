"""``python -m safesteer.compare`` end to end on the tiny model: real SafeSteer runs (Ray, vLLM,
DeepSpeed), real TRL SFT and DPO trainers, real evaluation engines; then a second invocation that
reuses every finished point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from safesteer.config import compose
from safesteer.errors import SafeSteerError

METHODS = ["safesteer", "full_vocab", "sft", "dpo", "distill", "steered", "gated", "system_prompt"]
DEPLOYED = ("steered", "gated", "system_prompt")


def compare(run_dir, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "safesteer.compare",
        "+experiment=smoke",
        f"hydra.run.dir={run_dir}",
        f"compare.methods=[{','.join(METHODS)}]",
        "compare.sweeps.safesteer={teacher.coeff:[0.5,1.0]}",  # a dict override merges: every knob given
        "compare.sweeps.full_vocab={teacher.coeff:[1.0]}",
        "compare.sweeps.sft.lr=[1e-4]",
        "compare.sweeps.sft.epochs=[1]",
        "compare.sweeps.dpo={beta:[0.1,0.5],lr:[1e-4],epochs:[1]}",
        "compare.sweeps.distill.lr=[1e-4]",
        "compare.sweeps.steered.coeff=[1.0]",
        "compare.sweeps.gated.coeff=[1.0]",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "compare.methods=[nope]",
            "compare.methods=['nope']: choose from safesteer, full_vocab, sft, dpo, distill, steered, gated, system_prompt",
        ),
        ("+compare.sweeps.sft.bogus=[1]", "compare.sweeps.sft=bogus: knobs of sft: lr, epochs"),
        ("compare.sweeps.dpo.beta=[]", "compare.sweeps.dpo.beta=[]: needs a non-empty list of values"),
    ],
)
def test_a_bad_comparison_setting_is_one_line(override: str, message: str) -> None:
    with pytest.raises(SafeSteerError) as e:
        compose(["+experiment=smoke", override])
    assert str(e.value) == message


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_method_gets_a_row_and_a_finished_comparison_is_reused(tmp_path) -> None:
    run_dir = tmp_path / "cmp"
    p = compare(run_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((run_dir / "compare.json").read_text())
    by_method = {m: [r for r in result["points"] if r["method"] == m] for m in METHODS}
    assert {m: len(rs) for m, rs in by_method.items()} == {
        "safesteer": 2,
        "full_vocab": 1,
        "sft": 1,
        "dpo": 2,
        "distill": 1,
        "steered": 1,
        "gated": 1,
        "system_prompt": 1,
    }
    for r in result["points"]:
        for group in ("harmful_refusal_mean", "benign_refusal_mean", "edgy_refusal_mean", "mmlu"):
            assert r["eval"][group] is not None, (r["method"], group)
        assert 0 <= r["validation"]["selectivity"] + 2 <= 3, r
        answers = [json.loads(line) for line in open(r["answers"], encoding="utf-8")]
        assert len(answers) > 20 and all(a["after"]["answer"] is not None for a in answers), r["method"]
        if r["method"] in DEPLOYED:  # no training; the cost is at inference
            assert r["train_seconds"] == 0 and r["eval"]["tokens_per_s_deployed"] > 0, r
            assert (run_dir / r["method"]).is_dir()
        else:
            assert r["trained_tokens"] > 0 and r["train_seconds"] > 0, r
    # each method's chosen point is its best on validation, whatever the evaluation says
    for m, rs in by_method.items():
        best = max(rs, key=lambda r: r["validation"]["selectivity"])
        assert result["chosen"][m] == best["knobs"]
    text = (run_dir / "compare.md").read_text()
    table = text[text.index("| method") : text.index("\n\n", text.index("| method"))]  # the chosen points
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["original", *METHODS]
    assert all("–" not in r.split("|")[3] for r in rows)  # every row's first set is filled
    assert "## Every point" in text and "## Answers" in text and "SafeSteer's chosen point" in text
    assert (run_dir / "compare.html").stat().st_size > 10_000  # the plot inlined
    assert (run_dir / "frontier.png").stat().st_size > 10_000
    assert (run_dir / "paired_answers.jsonl").is_file()

    again = compare(run_dir)  # nothing to recompute: every point is reused
    assert again.returncode == 0, again.stderr[-3000:]
    logs = again.stdout + again.stderr
    assert logs.count("): reusing") == 10 and "running:" not in logs, logs[-3000:]
    assert json.loads((run_dir / "compare.json").read_text())["chosen"] == result["chosen"]

    # compare.evaluate=chosen: a new point is validated; only each method's chosen point is evaluated
    third = compare(run_dir, "compare.sweeps.steered.coeff=[1.0,0.25]", "compare.evaluate=chosen")
    assert third.returncode == 0, third.stderr[-3000:]
    result = json.loads((run_dir / "compare.json").read_text())
    steered = [r for r in result["points"] if r["method"] == "steered"]
    assert [r["knobs"]["coeff"] for r in steered] == [1.0, 0.25]
    best = max(steered, key=lambda r: r["validation"]["selectivity"])
    assert result["chosen"]["steered"] == best["knobs"] and "eval" in best
    new = steered[1]
    assert ("eval" in new) == (new is best), new  # evaluated only when validation chose it
    text = (run_dir / "compare.md").read_text()
    assert ("not evaluated (compare.evaluate=chosen)" in text) == (new is not best)


def point(method: str, harmful: float, benign: float, mmlu: float) -> dict:
    return {
        "method": method,
        "knobs": {"x": 1},
        "eval": {"harmful_refusal_mean": harmful, "benign_refusal_mean": benign, "mmlu": mmlu},
        "original": {"mmlu": 0.30},
    }


def test_the_frontier_check_names_exactly_the_dominating_points() -> None:
    from safesteer.compare import dominating, frontier_lines

    ours = point("safesteer", 0.50, 0.10, 0.29)
    others = [
        point("sft", 0.60, 0.10, 0.29),  # dominates: safer, no more over-refusal, MMLU within 2 points
        point("dpo", 0.70, 0.12, 0.30),  # more over-refusal
        point("steered", 0.90, 0.05, 0.27),  # MMLU 3 points down
        point("gated", 0.50, 0.05, 0.30),  # not safer
        point("safesteer", 0.90, 0.0, 0.30),  # the same method: not a baseline
    ]
    assert dominating([ours, *others], ours) == [others[0]]
    lines = frontier_lines([ours, *others], {"safesteer": ours})
    assert "dominated by 1 point(s)" in lines[0] and lines[2].startswith("- sft (x=1): harmful 60%")
    assert "on the frontier" in frontier_lines([ours, *others[1:]], {"safesteer": ours})[0]
