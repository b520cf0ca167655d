"""The run report: report.md (and report.html) from metrics.json."""

from __future__ import annotations

from pathlib import Path

from safesteer.paths import atomic_write_text


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def markdown(results: dict, tokens) -> str:
    lines = ["# SafeSteer run report", ""]
    b, a = results.get("before"), results.get("after")
    if b and a:
        lines += ["| set | metric | before | after |", "|---|---|---|---|"]
        for name in b["sets"]:
            for m in ("refusal", "preamble", "degenerate"):
                lines.append(f"| {name} | {m} | {_pct(b['sets'][name][m])} | {_pct(a['sets'][name][m])} |")
        lines.append(
            f"| all harmful | mean refusal | {_pct(b['harmful_refusal_mean'])} | {_pct(a['harmful_refusal_mean'])} |"
        )
        lines.append(f"| MMLU subset | accuracy | {_pct(b['mmlu'])} | {_pct(a['mmlu'])} |")
        lines.append(f"| benign answers | KL(orig‖trained)/token | 0 | {a['kl_per_token']:.4f} |")
        lines.append(f"| benign answers | perplexity | {a['ppl_original']:.2f} | {a['ppl_trained']:.2f} |")
        lines.append("")
    hist = results.get("history") or []
    if hist:
        lines += [
            "## Training",
            "",
            "| step | loss | safety mass | grad norm | step s |",
            "|---|---|---|---|---|",
        ]
        for r in hist:
            lines.append(
                f"| {r['step']} | {r['loss']:.4f} | {r['safety_mass']:.3f} | {r['grad_norm']:.3f} | {r['step_s']:.1f} |"
            )
        lines.append("")
    lines += ["## Safety tokens", "", "```", tokens.table(20), "```", ""]
    ex = results.get("examples") or {}
    if ex:
        lines += ["## Examples (before → after)", ""]
        for name, rows in ex.items():
            for prompt, before, after in rows[:2]:
                lines += [f"**{name}**: {prompt}", "", f"- before: {before!r}", f"- after: {after!r}", ""]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, results: dict, tokens) -> None:
    atomic_write_text(Path(run_dir) / "report.md", markdown(results, tokens))
