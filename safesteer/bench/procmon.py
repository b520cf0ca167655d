"""Run one system in a child process and record the peak memory of it and of every descendant.

Each process's peak resident set size is the kernel's high-water mark (``VmHWM`` in
``/proc/PID/status``), read every ``interval`` seconds while the process lives, so the figure is
exact up to what happens in its last ``interval``. Ray actors are named by their process title
(``ray::RolloutWorker`` ...); Ray's own daemons and idle workers count as ``ray_system``. The largest
sum of current RSS over the whole tree is kept too (it counts shared pages once per process, and
pages of files a process maps, e.g. safetensors weights read through mmap, which the kernel can
drop); so is the largest sum of anonymous and shared-memory pages (``RssAnon + RssShmem``: what
cannot be dropped, each file-backed page left out), and the largest sum of proportional set sizes
(``Pss`` in ``/proc/PID/smaps_rollup``: every resident page, file-backed ones included, counted once
over all processes), the figure to hold against the machine's memory. Reading ``smaps_rollup`` walks a
process's page tables (up to a second for a 10 GB learner, slowing it), so the PSS sum is sampled
every ``pss_interval`` seconds only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROLES = (("RolloutWorker", "rollout"), ("TeacherWorker", "teacher"), ("LearnerWorker", "learner"))
RAY_MARKERS = ("ray::", "raylet", "gcs_server", "ray/dashboard", "ray/_private", "ray/autoscaler")
MiB = 1024 * 1024


def _proc_kib(pid: int, file: str, key: str) -> int | None:
    """The ``key:`` line of ``/proc/PID/<file>`` (``status``, ``smaps_rollup``) in KiB, None if gone."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _status_kib(pid: int, key: str) -> int | None:
    return _proc_kib(pid, "status", key)


def classify(cmdline: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    for marker, role in ROLES:
        if marker in cmdline:
            return role
    if any(m in cmdline for m in RAY_MARKERS):
        return "ray_system"
    return "other"


class TreeMonitor(threading.Thread):
    """Samples a process tree until :meth:`stop`; ``processes()`` gives each process's peak."""

    def __init__(self, root_pid: int, interval: float = 0.5, pss_interval: float = 10.0):
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.pss_interval = root_pid, interval, pss_interval
        self._pss_at = float("-inf")
        self._halt = threading.Event()
        self.seen: dict[tuple[int, float], dict] = {}  # (pid, create_time) -> record
        self._handles: dict[tuple[int, float], psutil.Process] = {}
        self.total_peak_mb = 0.0
        self.anon_peak_mb = 0.0
        self.pss_peak_mb = 0.0
        self.pss_peak_by_role: dict[str, float] = {}  # the roles' PSS in the sample of the peak
        self.pss_peak_at_s = 0.0
        self._t0 = time.monotonic()

    def _tree(self) -> list[psutil.Process]:
        procs = []
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            pass
        # processes re-parented away from the tree (orphans) are still followed
        pids = {p.pid for p in procs}
        procs += [h for h in self._handles.values() if h.pid not in pids and h.is_running()]
        return procs

    def sample(self) -> None:
        total = anon = pss = 0.0
        pss_by_role: dict[str, float] = {}
        now = time.monotonic()
        with_pss = now - self._pss_at >= self.pss_interval
        if with_pss:
            self._pss_at = now
        for p in self._tree():
            try:
                key = (p.pid, p.create_time())
                cmd = " ".join(p.cmdline())
                rss = p.memory_info().rss / MiB
            except psutil.Error:
                continue
            hwm = _status_kib(p.pid, "VmHWM")
            peak = hwm / 1024 if hwm is not None else rss
            p_anon = sum(_status_kib(p.pid, k) or 0 for k in ("RssAnon", "RssShmem")) / 1024
            total, anon = total + rss, anon + p_anon
            role = classify(cmd, p.pid == self.root_pid)
            if with_pss:
                p_pss = (_proc_kib(p.pid, "smaps_rollup", "Pss") or 0) / 1024
                pss += p_pss
                pss_by_role[role] = pss_by_role.get(role, 0.0) + p_pss
            rec = self.seen.get(key)
            if rec is None:
                rec = {
                    "pid": p.pid,
                    "role": role,
                    "name": cmd.strip()[:120],
                    "peak_rss_mb": 0.0,
                    "peak_anon_mb": 0.0,
                }
                self.seen[key] = rec
                self._handles[key] = p
            elif rec["role"] in ("ray_system", "other") and role not in ("ray_system", "other"):
                rec["role"], rec["name"] = role, cmd.strip()[:120]  # an idle Ray worker became an actor
            rec["peak_rss_mb"] = max(rec["peak_rss_mb"], peak)
            rec["peak_anon_mb"] = max(rec["peak_anon_mb"], p_anon)
        self.total_peak_mb = max(self.total_peak_mb, total)
        self.anon_peak_mb = max(self.anon_peak_mb, anon)
        if pss > self.pss_peak_mb:
            self.pss_peak_mb, self.pss_peak_by_role = pss, pss_by_role
            self.pss_peak_at_s = now - self._t0

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def alive(self) -> list[psutil.Process]:
        out = []
        for h in self._handles.values():
            try:
                if h.is_running() and h.status() != psutil.STATUS_ZOMBIE:
                    out.append(h)
            except psutil.Error:
                pass
        return out

    def processes(self) -> list[dict]:
        return sorted(self.seen.values(), key=lambda r: (r["role"], r["pid"]))


def memory_summary(
    processes: list[dict],
    total_peak_mb: float,
    anon_peak_mb: float = 0.0,
    pss_peak_mb: float = 0.0,
    pss_peak_by_role: dict | None = None,
    pss_peak_at_s: float = 0.0,
) -> dict:
    """Per-role figures: the largest peak among a role's processes, and how many there were."""
    by_role: dict[str, dict] = {}
    for p in processes:
        r = by_role.setdefault(p["role"], {"count": 0, "max_peak_rss_mb": 0.0, "sum_peak_rss_mb": 0.0})
        r["count"] += 1
        r["max_peak_rss_mb"] = max(r["max_peak_rss_mb"], p["peak_rss_mb"])
        r["sum_peak_rss_mb"] += p["peak_rss_mb"]
    return {
        "processes": processes,
        "by_role": by_role,
        "tree_peak_rss_mb": total_peak_mb,
        "tree_peak_anon_mb": anon_peak_mb,
        "tree_peak_pss_mb": pss_peak_mb,
        "pss_peak_by_role_mb": pss_peak_by_role or {},
        "pss_peak_at_s": pss_peak_at_s,
    }


def run_monitored(
    cmd: list[str],
    log_path: Path,
    env: dict | None,
    cwd: Path,
    timeout_s: float,
    interval: float = 0.5,
    pss_interval: float = 10.0,
) -> dict:
    """Run ``cmd`` to completion (stdout+stderr to ``log_path``) while sampling its process tree.

    Leftover descendants (e.g. Ray daemons still shutting down) get 60 s to exit and are then
    terminated, so that they cannot disturb the next measurement.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        mon = TreeMonitor(proc.pid, interval, pss_interval)
        mon.sample()
        mon.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _terminate(_tree_of(proc.pid) + mon.alive())
            proc.wait()
            rc = None  # killed: no exit status of its own
        except BaseException:  # Ctrl-C: the child runs in its own session and would not see it
            mon.sample()
            _terminate(_tree_of(proc.pid) + mon.alive())
            mon.stop()
            raise
        wall = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while mon.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = mon.alive()
        mon.stop()
        if leftover:
            _terminate(leftover)
    return {
        "returncode": rc,
        "timed_out": timed_out,
        "process_wall_s": wall,
        "leftover_processes": len(leftover),
        "memory": memory_summary(
            mon.processes(),
            mon.total_peak_mb,
            mon.anon_peak_mb,
            mon.pss_peak_mb,
            mon.pss_peak_by_role,
            mon.pss_peak_at_s,
        ),
    }


def _tree_of(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _terminate(procs: list[psutil.Process]) -> None:
    procs = list({p.pid: p for p in procs}.values())
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def main(argv: list[str] | None = None) -> int:
    """``python -m safesteer.bench.procmon OUT.json -- CMD ...``: run CMD (its output to OUT.log) and
    write its exit status, wall time and the peak memory of it and of every process it started."""
    ap = argparse.ArgumentParser(
        prog="python -m safesteer.bench.procmon",
        usage="%(prog)s [options] OUT.json -- CMD ...",
        description=main.__doc__,
    )
    ap.add_argument("out", type=Path, help="where the JSON summary goes (the log beside it, .log)")
    ap.add_argument("--timeout-s", type=float, default=6 * 3600)
    ap.add_argument("--pss-interval", type=float, default=10.0, help="seconds between PSS samples")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, cmd = ap.parse_args(argv[:cut]), argv[cut + 1 :]
    if not cmd:
        ap.error("no command given (put it after --)")
    res = run_monitored(
        cmd,
        args.out.with_suffix(".log"),
        dict(os.environ),
        Path.cwd(),
        args.timeout_s,
        0.5,
        args.pss_interval,
    )
    res["cmd"] = cmd
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, args.out)
    mem = res["memory"]
    print(
        f"rc={res['returncode']} wall={res['process_wall_s']:.0f}s all processes: peak RSS sum "
        f"{mem['tree_peak_rss_mb'] / 1024:.2f} GiB, peak anonymous sum {mem['tree_peak_anon_mb'] / 1024:.2f} GiB, "
        f"peak PSS sum {mem['tree_peak_pss_mb'] / 1024:.2f} GiB",
        file=sys.stderr,
    )
    return 0 if res["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
