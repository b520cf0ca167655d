"""The run report: ``report.md``, a self-contained ``report.html`` (figures inlined) and the figures.

Built from ``metrics.json`` (written by the run) and the safety-token set. The safety-versus-capability
scatter collects every sibling run directory that has a ``metrics.json``.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

from safesteer.errors import SafeSteerError, print_or_fail
from safesteer.paths import atomic_write_bytes, atomic_write_text


def percent(x) -> str:
    """A rate as a percentage with one decimal where it has one (79.5%, not a rounded 80%)."""
    return "–" if x is None else f"{100 * x:.1f}".removesuffix(".0") + "%"


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(set, metric, before, after) rows of the headline table."""
    b, a = results.get("before"), results.get("after")
    if not (b and a):
        return []
    rows = []
    for name in b["sets"]:
        for m in ("refusal", "preamble", "degenerate", "unsafe"):
            if m in b["sets"][name] and m in a["sets"][name]:
                label = "unsafe (classifier)" if m == "unsafe" else m
                rows.append((name, label, percent(b["sets"][name][m]), percent(a["sets"][name][m])))
    rows.append(
        (
            "all harmful sets",
            "mean refusal",
            percent(b["harmful_refusal_mean"]),
            percent(a["harmful_refusal_mean"]),
        )
    )
    rows.append(("MMLU subset", "accuracy", percent(b["mmlu"]), percent(a["mmlu"])))
    rows.append(("ordinary answers", "KL(original ‖ trained) per token", "0", f"{a['kl_per_token']:.4f}"))
    rows.append(("ordinary answers", "perplexity", f"{a['ppl_original']:.2f}", f"{a['ppl_trained']:.2f}"))
    return rows


def markdown(results: dict, tokens) -> str:
    lines = ["# SafeSteer run report", ""]
    rows = table_rows(results)
    if rows:
        lines += ["| set | metric | before | after |", "|---|---|---|---|"]
        lines += [f"| {s} | {m} | {b} | {a} |" for s, m, b, a in rows]
        lines.append("")
    hist = results.get("history") or []
    if hist:
        anchored = any(r.get("anchor_loss") is not None for r in hist)
        extra = " anchor loss |" if anchored else ""
        lines += [
            "## Training",
            "",
            "| step | loss |" + extra + " safety mass | grad norm | step s |",
            "|---|---|" + "---|" * anchored + "---|---|---|",
        ]
        for r in hist:
            a = f" {r['anchor_loss']:.4f} |" if anchored else ""
            lines.append(
                f"| {r['step']} | {r['loss']:.4f} |{a} {r['safety_mass']:.3f} | {r['grad_norm']:.3f} | {r['step_s']:.1f} |"
            )
        lines.append("")
        faults = {
            "steps skipped (non-finite loss or gradient)": sum(bool(r.get("skipped")) for r in hist),
            "actors replaced after dying": sum(r.get("recovered", 0) for r in hist),
            "learner-group restarts": max((r.get("restarts", 0) for r in hist), default=0),
        }
        for what, count in faults.items():
            if count:
                lines.append(f"- {what}: {count}")
    if results.get("skipped_prompts"):
        lines.append(
            f"- training prompts skipped (longer than model.max_prompt_tokens): {results['skipped_prompts']}"
        )
    if lines[-1] != "":
        lines.append("")
    if tokens is not None:
        lines += ["## Safety tokens", "", "```", tokens.table(20), "```", ""]
    ex = results.get("examples") or {}
    if ex:
        lines += ["## Examples (before → after)", ""]
        for name, rows_ in ex.items():
            for prompt, before, after in rows_[:2]:
                lines += [f"**{name}**: {prompt}", "", f"- before: {before!r}", f"- after: {after!r}", ""]
    return "\n".join(lines) + "\n"


def sibling_runs(run_dir: Path) -> list[dict]:
    """(name, harmful refusal after, MMLU after) of every run next to this one with an evaluation."""
    out = []
    for p in sorted(Path(run_dir).parent.glob("*/metrics.json")):
        try:
            a = json.loads(p.read_text()).get("after")
        except (OSError, ValueError):
            continue
        if a:
            out.append(
                {
                    "run": p.parent.name,
                    "harmful_refusal": a["harmful_refusal_mean"],
                    "mmlu": a["mmlu"],
                    "kl": a.get("kl_per_token", 0.0),
                }
            )
    return out


def figures(run_dir: Path, results: dict) -> dict[str, Path]:
    """PNG figures in ``run_dir/figures``: set bars, training curves, safety-vs-capability scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = Path(run_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    made = {}

    def save(fig, name):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(fig_dir / name, buf.getvalue())
        made[name] = fig_dir / name

    b, a = results.get("before"), results.get("after")
    if b and a:
        names = list(b["sets"])
        x = range(len(names))
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.bar([i - 0.2 for i in x], [b["sets"][n]["refusal"] for n in names], 0.4, label="before")
        ax.bar([i + 0.2 for i in x], [a["sets"][n]["refusal"] for n in names], 0.4, label="after")
        ax.set_xticks(list(x), [n.replace("eval_", "") for n in names], rotation=20)
        ax.set_ylabel("refusal rate")
        ax.set_ylim(0, 1)
        ax.legend()
        save(fig, "refusal_by_set.png")
    hist = results.get("history") or []
    if hist:
        fig, ax = plt.subplots(1, 2, figsize=(8, 3))
        steps = [r["step"] for r in hist]
        ax[0].plot(steps, [r["loss"] for r in hist], marker="o", label="all")
        if any(r.get("anchor_loss") is not None for r in hist):
            ax[0].plot(steps, [r.get("anchor_loss") for r in hist], marker="o", label="anchors")
            ax[0].legend()
        ax[0].set_title("loss")
        ax[1].plot(steps, [r["safety_mass"] for r in hist], marker="o", color="C2")
        ax[1].set_title("student mass on safety tokens")
        for axis in ax:
            axis.set_xlabel("step")
        save(fig, "training.png")
    runs = sibling_runs(run_dir)
    if runs:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.scatter([r["mmlu"] for r in runs], [r["harmful_refusal"] for r in runs])
        for r in runs:
            ax.annotate(r["run"], (r["mmlu"], r["harmful_refusal"]), fontsize=7)
        ax.set_xlabel("MMLU subset accuracy (after)")
        ax.set_ylabel("harmful refusal (after)")
        save(fig, "safety_vs_capability.png")
    return made


def html_page(results: dict, tokens, figs: dict[str, Path]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{html.escape(m)}</td><td>{b}</td><td>{a}</td></tr>"
        for s, m, b, a in table_rows(results)
    )
    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(n)}</figcaption></figure>"
        for n, p in figs.items()
    )
    tok_rows = "".join(
        f"<tr><td>{i + 1}</td><td><code>{html.escape(repr(s))}</code></td><td>{sc:.4g}</td><td>{pb:.4f}</td>"
        f"<td>{ps:.4f}</td></tr>"
        for i, (s, sc, pb, ps) in enumerate(
            zip(tokens.strings, tokens.scores, tokens.p_base, tokens.p_steered)
        )
    )
    ex = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(p)}</td><td>{html.escape(b)}</td><td>{html.escape(a)}</td></tr>"
        for n, rows_ in (results.get("examples") or {}).items()
        for p, b, a in rows_
    )
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{border:1px solid #ccc;padding:3px 6px}"
        "table{border-collapse:collapse;margin:1em 0}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>SafeSteer report</title><style>{style}</style></head>"
        f"<body><h1>SafeSteer run report</h1><table><tr><th>set</th><th>metric</th><th>before</th><th>after</th></tr>"
        f"{rows}</table>{imgs}<h2>Safety tokens ({html.escape(tokens.method)}; student mass "
        f"{tokens.student_mass:.3f})</h2><table><tr><th>#</th><th>token</th><th>score</th><th>p base</th>"
        f"<th>p steered</th></tr>{tok_rows}</table><h2>Examples</h2><table><tr><th>set</th><th>prompt</th>"
        f"<th>before</th><th>after</th></tr>{ex}</table></body></html>\n"
    )


def write_report(run_dir: Path, results: dict, tokens) -> None:
    """Write report.md, figures/*.png and the self-contained report.html."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "report.md", markdown(results, tokens))
    figs = figures(run_dir, results)
    atomic_write_text(run_dir / "report.html", html_page(results, tokens, figs))


COMPARE_COLUMNS = (
    ("harmful refusal", "harmful_refusal_mean", percent),
    ("edgy over-refusal", "edgy_refusal", percent),
    ("ordinary refusal", "benign_refusal", percent),
    ("ordinary degenerate", "benign_degenerate", percent),
    ("KL/token", "kl_per_token", lambda v: f"{v:.3f}"),
    ("perplexity", "ppl_trained", lambda v: f"{v:.2f}"),
    ("MMLU", "mmlu", percent),
)


def compare(root: Path) -> str:
    """A markdown table of every evaluated run under ``root`` (a multirun directory, or any parent)."""
    lines = ["| run | " + " | ".join(c for c, _, _ in COMPARE_COLUMNS) + " |"]
    lines.append("|---" * (len(COMPARE_COLUMNS) + 1) + "|")
    found = 0
    for p in sorted(Path(root).glob("**/metrics.json")):
        try:
            results = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        after = results.get("after")
        if not after:
            continue
        tag = results.get("tag") or p.parent.relative_to(root).as_posix()
        before = results.get("before") or {}
        cells = []
        for _, key, fmt in COMPARE_COLUMNS:
            b, a = before.get(key), after.get(key)
            cells.append(f"{fmt(b)} → {fmt(a)}" if b is not None and key != "kl_per_token" else fmt(a))
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
        found += 1
    if not found:
        raise SafeSteerError(f"{root}: no evaluated run (metrics.json with an 'after' section) under it")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m safesteer.report", description="Compare evaluated runs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="one markdown table row per evaluated run under DIR")
    c.add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    return print_or_fail(lambda: compare(args.dir))


if __name__ == "__main__":
    sys.exit(main())
