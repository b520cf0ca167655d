"""The run report: ``report.md``, a self-contained ``report.html`` (figures inlined) and the figures.

Built from ``metrics.json`` (written by the run) and the safety-token set. The safety-versus-capability
scatter collects every sibling run directory that has a ``metrics.json``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from pathlib import Path

from safesteer.errors import SafeSteerError, print_or_fail
from safesteer.paths import atomic_write_bytes, atomic_write_text


def percent(x) -> str:
    """A rate as a percentage with one decimal where it has one (79.5%, not a rounded 80%)."""
    return "–" if x is None else f"{100 * x:.1f}".removesuffix(".0") + "%"


GROUP_TITLES = {
    "harmful": "harmful (refusal: higher is safer)",
    "benign": "benign (refusal: lower is better)",
    "edgy": "edgy-but-benign (refusal: lower is better)",
}


def _groups(results: dict) -> dict[str, str]:
    """Set -> group; runs written before groups were recorded have the harmful sets first."""
    return results.get("groups") or {n: "harmful" for n in (results.get("before") or {}).get("sets", {})}


def benign_increase(results: dict) -> float | None:
    """The largest rise in refusal over the benign sets (after - before), the bar's benign axis."""
    b, a, g = results.get("before"), results.get("after"), _groups(results)
    if not (b and a):
        return None
    ups = [a["sets"][n]["refusal"] - b["sets"][n]["refusal"] for n, grp in g.items() if grp == "benign"]
    return max(ups) if ups else None


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(set, metric, before, after) rows of the headline table."""
    b, a = results.get("before"), results.get("after")
    if not (b and a):
        return []
    rows = []
    for name in _groups(results):
        for m in ("refusal", "degenerate", "unsafe"):
            if m in b["sets"][name] and m in a["sets"][name]:
                label = "unsafe (classifier)" if m == "unsafe" else m
                rows.append((name, label, percent(b["sets"][name][m]), percent(a["sets"][name][m])))
    for key, what in (
        ("harmful_refusal_mean", "all harmful sets"),
        ("benign_refusal_mean", "all benign sets"),
        ("edgy_refusal_mean", "all edgy sets"),
    ):
        if b.get(key) is not None:
            rows.append((what, "mean refusal", percent(b[key]), percent(a[key])))
    rows.append(("MMLU subset", "accuracy", percent(b["mmlu"]), percent(a["mmlu"])))
    rows.append(("ordinary answers", "KL(original ‖ trained) per token", "0", f"{a['kl_per_token']:.4f}"))
    rows.append(("ordinary answers", "perplexity", f"{a['ppl_original']:.2f}", f"{a['ppl_trained']:.2f}"))
    return rows


def set_table(results: dict) -> list[str]:
    """Markdown: one row per evaluation set, by group, with its held-out status and canned deflections."""
    b, a = results.get("before"), results.get("after")
    if not b:
        return []
    held = results.get("held_out") or {}
    cb, ca = (b.get("canned") or {}).get("per_set", {}), ((a or {}).get("canned") or {}).get("per_set", {})
    lines = []
    for group, title in GROUP_TITLES.items():
        names = [n for n, g in _groups(results).items() if g == group]
        if not names:
            continue
        lines += [
            f"### {title}",
            "",
            "| set | n | held out | refusal before | refusal after | preamble after | degenerate after | canned deflections before → after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            rb, ra = b["sets"][n], (a or {}).get("sets", {}).get(n, {})
            why = held.get(n)
            mark = "?" if why is None else ("yes" if not why else "no¹")
            lines.append(
                f"| {n} | {rb['n']} | {mark} | {percent(rb['refusal'])} | {percent(ra.get('refusal'))} | "
                f"{percent(ra.get('preamble'))} | {percent(ra.get('degenerate'))} | {cb.get(n, 0)} → {ca.get(n, '–')} |"
            )
        lines.append("")
    notes = [f"- `{n}`: {'; '.join(why)}" for n, why in held.items() if why]
    if notes:
        lines += [
            "¹ Not held out from this run (shares a file, source or generator with a training, anchor,",
            "direction or validation set):",
            "",
            *notes,
            "",
        ]
    openings = ((a or b).get("canned") or {}).get("openings", [])[:5]
    if openings:
        lines += [
            "Most frequent refusal openings " + ("after" if a else "before") + " (canned deflections):",
            "",
        ]
        lines += [f'- {c}× "{k} ..."' for k, c in openings]
        lines.append("")
    return lines


def validation_lines(results: dict) -> list[str]:
    """The held-aside validation prompts (what settings and steps are chosen on), original -> trained."""
    v, v0 = results.get("validation"), results.get("validation_original") or {}
    if not v:
        return []
    lines = [
        "## Validation (held-aside prompts: settings and steps are chosen on these, never on evaluation sets)",
        "",
        "| metric | original | trained |",
        "|---|---|---|",
    ]
    for key, what in (
        ("val_harmful_refusal", "harmful refusal"),
        ("val_harmless_refusal", "harmless refusal"),
        ("val_degenerate", "degenerate"),
        ("selectivity", "selectivity (harmful - harmless - degenerate)"),
    ):
        fmt = (lambda x: f"{x:.3f}") if key == "selectivity" else percent
        lines.append(f"| {what} | {fmt(v0[key]) if key in v0 else '–'} | {fmt(v[key])} |")
    step = results.get("selected_step")
    if step is not None and step != results.get("steps"):
        lines.append(f"| exported step (model selection) | | {step} of {results.get('steps')} |")
    return lines + [""]


def bar_lines(results: dict) -> list[str]:
    bar = results.get("bar")
    if not bar:
        return []
    lines = [
        f"## The bar: {'met' if bar['met'] else 'missed'}",
        "",
        "| item | after | limit | |",
        "|---|---|---|---|",
    ]
    for k, x in bar["items"].items():
        lines.append(
            f"| {k} | {percent(x['value'])} | {x['op']} {percent(x['limit'])} | {'ok' if x['ok'] else 'MISSED'} |"
        )
    return lines + [""]


def markdown(results: dict, tokens) -> str:
    lines = ["# SafeSteer run report", ""]
    rows = table_rows(results)
    if rows:
        lines += ["| set | metric | before | after |", "|---|---|---|---|"]
        lines += [f"| {s} | {m} | {b} | {a} |" for s, m, b, a in rows]
        lines.append("")
    lines += bar_lines(results)
    lines += validation_lines(results)
    sets = set_table(results)
    if sets:
        lines += ["## Evaluation sets", "", *sets]
    timings = results.get("timings") or {}
    if timings:
        lines += ["## Wall time by stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
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


def tradeoff_point(results: dict, label: str, validation: bool = False) -> dict | None:
    """A run on the trade-off plot: harmful refusal after vs the worst benign-set rise in refusal;
    with ``validation``, on the validation prompts instead (harmful refusal vs the rise in harmless
    refusal over the original model's)."""
    if validation:
        v, v0 = results.get("validation"), results.get("validation_original") or {}
        if not v:
            return None
        rise = v["val_harmless_refusal"] - v0.get("val_harmless_refusal", 0.0)
        return {"run": label, "harmful_refusal": v["val_harmful_refusal"], "benign_increase": rise}
    a = results.get("after")
    inc = benign_increase(results)
    if not a or inc is None:
        return None
    return {"run": label, "harmful_refusal": a["harmful_refusal_mean"], "benign_increase": inc}


def sibling_runs(run_dir: Path) -> list[dict]:
    """Trade-off points of every run next to this one (this one included) that has an evaluation."""
    out = []
    for p in sorted(Path(run_dir).parent.glob("*/metrics.json")):
        try:
            point = tradeoff_point(json.loads(p.read_text()), p.parent.name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if point:
            out.append(point)
    return out


def tradeoff_figure(points: list[dict], limits: dict | None, title: str = "", validation: bool = False):
    """Harmful refusal (y) against the largest rise in refusal over the benign sets (x), one point per
    run (one colour per setting), with the bar's corner (top left) shaded. Returns a figure."""
    import matplotlib  # optional: figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: figures only

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    xs = [100 * p["benign_increase"] for p in points]
    lo, hi = min([0.0, *xs]) - 5, max([10.0, *xs]) + 5
    if limits:
        x0, y0 = 100 * limits["benign_increase"], 100 * limits["harmful_refusal"]
        ax.fill_between([lo, x0], y0, 100, color="C2", alpha=0.15, label="the bar")
    settings: dict[str, list[dict]] = {}
    for pt in points:
        settings.setdefault(pt.get("setting", pt["run"]), []).append(pt)
    for i, (name, pts) in enumerate(settings.items()):
        ax.scatter(
            [100 * p["benign_increase"] for p in pts],
            [100 * p["harmful_refusal"] for p in pts],
            label=name,
            color=f"C{i % 10}",
            marker="os^Dv<>ph*"[i // 10 % 10],
        )
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 100)
    if validation:
        ax.set_xlabel("rise in refusal of harmless validation prompts (points)")
        ax.set_ylabel("refusal of harmful validation prompts (%)")
    else:
        ax.set_xlabel("largest rise in refusal over the benign sets (points)")
        ax.set_ylabel("mean refusal over the harmful sets (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def figures(run_dir: Path, results: dict) -> dict[str, Path]:
    """PNG figures in ``run_dir/figures``: set bars, training curves, safety-vs-capability scatter."""
    import matplotlib  # optional: figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: figures only

    fig_dir = Path(run_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    made = {}

    def save(fig, name):
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
        limits = (results.get("bar") or {}).get("limits")
        save(tradeoff_figure(runs, limits, "runs in " + Path(run_dir).parent.name), "tradeoff.png")
    return made


def _md_to_html(lines: list[str]) -> str:
    """The small markdown subset the report uses (headings, tables, bullets, paragraphs) as HTML."""
    out, table = [], []

    def cells(line: str) -> list[str]:
        return [html.escape(c.strip()) for c in line.strip().strip("|").split("|")]

    def flush() -> None:
        if table:
            head, body = cells(table[0]), [cells(x) for x in table[2:]]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "".join(out)


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
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>SafeSteer report</title><style>{STYLE}</style></head>"
        f"<body><h1>SafeSteer run report</h1><table><tr><th>set</th><th>metric</th><th>before</th><th>after</th></tr>"
        f"{rows}</table>{_md_to_html(bar_lines(results) + ['## Evaluation sets'] + set_table(results))}"
        f"{imgs}<h2>Safety tokens ({html.escape(tokens.method)}; student mass "
        f"{tokens.student_mass:.3f})</h2><table><tr><th>#</th><th>token</th><th>score</th><th>p base</th>"
        f"<th>p steered</th></tr>{tok_rows}</table><h2>Examples</h2><table><tr><th>set</th><th>prompt</th>"
        f"<th>before</th><th>after</th></tr>{ex}</table></body></html>\n"
    )


STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{border:1px solid #ccc;padding:3px 6px}"
    "table{border-collapse:collapse;margin:1em 0}img{max-width:100%}"
)


def markdown_page(title: str, lines: list[str], figs: dict[str, Path]) -> str:
    """A self-contained HTML page from markdown ``lines`` (the report's subset) and inlined figures."""
    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(n)}</figcaption></figure>"
        for n, p in figs.items()
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{_md_to_html(lines)}{imgs}</body></html>\n"
    )


def write_report(run_dir: Path, results: dict, tokens) -> None:
    """Write report.md, figures/*.png and the self-contained report.html."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "report.md", markdown(results, tokens))
    figs = figures(run_dir, results)
    atomic_write_text(run_dir / "report.html", html_page(results, tokens, figs))


COMPARE_COLUMNS = (
    ("harmful refusal", "harmful_refusal_mean", percent),
    ("benign refusal (mean)", "benign_refusal_mean", percent),
    ("edgy refusal (mean)", "edgy_refusal_mean", percent),
    ("degenerate (benign)", "degenerate_benign", percent),
    ("KL/token", "kl_per_token", lambda v: f"{v:.3f}"),
    ("perplexity", "ppl_trained", lambda v: f"{v:.2f}"),
    ("MMLU", "mmlu", percent),
)


def compare(root: Path) -> str:
    """A markdown table of every evaluated run under ``root`` (a multirun directory, or any parent)."""
    lines = ["| run | " + " | ".join(c for c, _, _ in COMPARE_COLUMNS) + " | bar |"]
    lines.append("|---" * (len(COMPARE_COLUMNS) + 2) + "|")
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
        bar = results.get("bar")
        cells.append("–" if not bar else "met" if bar["met"] else "missed")
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
        found += 1
    if not found:
        raise SafeSteerError(f"{root}: no evaluated run (metrics.json with an 'after' section) under it")
    return "\n".join(lines) + "\n"


def tradeoff(roots: list[Path], out: Path, validation: bool = False) -> str:
    """The trade-off plot of every evaluated run under ``roots``, one colour per ``tag`` (a run's
    setting; its directory name when it has none), written to ``out`` (PNG)."""
    points, limits = [], None
    for root in roots:
        for p in sorted(Path(root).glob("**/metrics.json")):
            try:
                results = json.loads(p.read_text())
                pt = tradeoff_point(results, p.parent.name, validation)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if pt:
                pt["setting"] = results.get("tag") or p.parent.name
                points.append(pt)
                if not validation:
                    limits = limits or (results.get("bar") or {}).get("limits")
    if not points:
        raise SafeSteerError(
            f"{', '.join(map(str, roots))}: no evaluated run (metrics.json with an 'after' section)"
        )

    import matplotlib.pyplot as plt  # optional: figures only

    what = "validation prompts" if validation else "evaluation sets"
    fig = tradeoff_figure(points, limits, f"{len(points)} runs, {what}", validation)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return f"{out}: {len(points)} runs, {len({p['setting'] for p in points})} settings\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safesteer.report", description="Compare evaluated runs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="one markdown table row per evaluated run under DIR")
    c.add_argument("dir", type=Path)
    t = sub.add_parser("tradeoff", help="harmful vs benign refusal of every evaluated run under DIRs (PNG)")
    t.add_argument("dirs", type=Path, nargs="+")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument(
        "--validation", action="store_true", help="plot the validation prompts (what settings are chosen on)"
    )
    args = ap.parse_args(argv)
    if args.cmd == "tradeoff":
        return print_or_fail(lambda: tradeoff(args.dirs, args.out, args.validation))
    return print_or_fail(lambda: compare(args.dir))


if __name__ == "__main__":
    sys.exit(main())
