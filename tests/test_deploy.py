"""The deployment recipes in deploy/, for real on this machine.

* Ray: a two-node Ray cluster (a head and a second ``ray start --address`` node process, each with its
  own custom resource) gets the ``smoke`` run through ``deploy/ray/submit.sh`` (``ray job submit``);
  the state API proves the rollout worker and learner ranks ran on the second node. A run asking for a
  resource no node has fails within ``cluster.placement_timeout_s``, naming it.
* Slurm: a real single-host Slurm (``deploy/slurm/local-test-cluster.sh``: slurmctld, slurmd, munge;
  installed with apt-get when missing) runs ``deploy/slurm/safesteer.sbatch`` with one node, and
  ``scancel`` of a running job leaves no process of it behind.

Isolation from other Ray instances on the machine: every cluster here has its own ports, temp dir and
auth token, and is stopped by signalling only the processes that carry its marker in their environment
(``ray stop`` would kill every Ray process of the user, other people's included).

The Slurm tests need root (or an already running Slurm); they fail when they cannot run, unless
SAFESTEER_SKIP_SLURM=1 is set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import kill_marked, pids_with_env

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
SHELL_SCRIPTS = [
    DEPLOY / "ray" / "submit.sh",
    DEPLOY / "slurm" / "safesteer.sbatch",
    DEPLOY / "slurm" / "ray-node.sh",
    DEPLOY / "slurm" / "local-test-cluster.sh",
]
SLURM_DIR = Path(os.environ.get("SAFESTEER_SLURM_DIR", "/tmp/safesteer-slurm"))
MARKER = "SAFESTEER_RAY_OWNER"  # the environment marker deploy/slurm/ray-node.sh also uses


# ------------------------------------------------------------------------------------------- helpers
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def short_tmpdir(prefix: str) -> Path:
    """A short path: Ray's Unix sockets live under its temp dir and are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cmdlines_containing(text: str) -> dict[int, str]:
    cmds = {int(p): cmdline(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    return {p: c for p, c in cmds.items() if c and text in c}


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"({path} does not exist)"


def run(cmd, env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, cwd=REPO, **kw)


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def assert_artifacts(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2], rows
    for name in ("metrics.json", "config.yaml", "export/model/model.safetensors", "export/model/config.json"):
        assert (run_dir / name).is_file(), name


# ------------------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    p = run(["bash", "-n", str(script)])
    assert p.returncode == 0, p.stderr
    if shutil.which("shellcheck"):  # CI images may lack it; bash -n always runs
        p = run(["shellcheck", "-x", str(script)])
        assert p.returncode == 0, p.stdout


# A stand-in for `ray start --block` that exits 1 on SIGTERM, as Ray 2.60's does when its raylet dies of
# the same signal first ("subprocess exited unexpectedly"). That race cannot be produced on demand with
# the real Ray (the Slurm tests below run the real one); the stand-in makes the exit status deterministic.
FAKE_RAY = """#!/usr/bin/env bash
tmp=""
for a in "$@"; do case "$a" in --temp-dir=*) tmp="${a#--temp-dir=}";; esac; done
trap 'exit 1' TERM
case " $* " in *" --head "*) echo 127.0.0.1:6379 > "$tmp/ray_current_cluster";; esac
while :; do sleep 0.1; done
"""


@pytest.mark.parametrize("how", ["scoped stop", "crash"])
def test_ray_node_tells_a_deliberate_stop_from_a_crash(tmp_path, how):
    """`ray-node.sh head` ends with status 0 when this job's scoped stop ended Ray, whatever status
    `ray start` then returns, and with that status (and an error line) when Ray died on its own."""
    bin_dir, ray_tmp = tmp_path / "bin", short_tmpdir("ssfk")
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    job = f"fake-{secrets.token_hex(4)}"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": job,
        "SAFESTEER_RAY_TMPDIR": str(ray_tmp),
        "SAFESTEER_RAY_ADDRESS_FILE": str(tmp_path / "address"),
        "SAFESTEER_RAY_STOP_GRACE_S": "5",
    }
    for k in ("SAFESTEER_LOG_DIR", "SAFESTEER_VENV", "SAFESTEER_SETUP", "SAFESTEER_RAY_STOP"):
        env.pop(k, None)
    owner = f"{MARKER}={job}:{ray_tmp}"
    node = DEPLOY / "slurm" / "ray-node.sh"
    head = subprocess.Popen([str(node), "head"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (tmp_path / "address").is_file(), 30), "the head never wrote its address"
        if how == "scoped stop":
            assert run([str(node), "stop"], env=env, timeout=60).returncode == 0
        else:
            for pid in pids_with_env(owner):
                os.kill(pid, 15)
        err = head.communicate(timeout=60)[1]
    finally:
        kill_marked(owner, grace=2)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if how == "scoped stop":
        assert head.returncode == 0, err
        assert "ray start ended (status 1, during this job's scoped stop)" in err, err
    else:
        assert head.returncode == 1, err
        assert "error: ray start exited with status 1" in err, err


def test_kuberay_manifest_and_runtime_env_are_well_formed():
    import yaml

    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "python -m safesteer.run" in spec["entrypoint"] and "cluster.address=auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(g["template"]["spec"]["containers"] for g in cluster["workerGroupSpecs"])
    env = yaml.safe_load((DEPLOY / "ray" / "runtime_env.yaml").read_text())
    assert {".venv/", ".git/", "outputs/"} <= set(env["excludes"])


# ------------------------------------------------------------------------------- a two-node Ray cluster
class RayCluster:
    """``ray start --head`` plus one ``ray start --address`` node process, private to this test module."""

    def __init__(self):
        self.tmp = short_tmpdir("ssray")
        self.marker = f"{MARKER}=pytest-{os.getpid()}-{self.tmp.name}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.gcs = self.dashboard = ""
        self.nodes: dict[str, str] = {}  # "head" / "node_b" -> node id

    def start(self) -> None:
        ray = str(VENV_BIN / "ray")
        marked = {**self.env, MARKER: self.marker.split("=", 1)[1]}
        port, dash, client, *rest = free_ports(15)

        def node_ports(ps):  # explicit: two nodes on one host must not both take Ray's fixed defaults
            names = (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                "node-manager-port",
                "object-manager-port",
            )
            return [f"--{n}={p}" for n, p in zip(names, ps)]

        # loopback only: the test cluster never talks over this machine's network address
        common = [f"--temp-dir={self.tmp}", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        head = [
            ray,
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={client}",
            "--num-cpus=2",
            '--resources={"head_node": 100}',
            *node_ports(rest[:6]),
            *common,
        ]
        p = run(head, env=marked, timeout=180)
        assert p.returncode == 0, tail(p.stdout + p.stderr)
        self.gcs = (self.tmp / "ray_current_cluster").read_text().strip()
        self.dashboard = f"http://127.0.0.1:{dash}"
        worker = [
            ray,
            "start",
            f"--address={self.gcs}",
            "--num-cpus=3",
            '--resources={"node_b": 10}',
            *node_ports(rest[6:]),
            *common,
        ]
        p = run(worker, env=marked, timeout=180)
        assert p.returncode == 0, tail(p.stdout + p.stderr)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = self.state("nodes")
            alive = [n for n in nodes if n["state"] == "ALIVE"]
            for n in alive:
                for key in ("head_node", "node_b"):
                    if key in n["resources_total"]:
                        self.nodes["head" if key == "head_node" else key] = n["node_id"]
            if len(self.nodes) == 2:
                return
            time.sleep(1)
        raise AssertionError(f"the second node did not join: {nodes}")

    def state(self, what: str) -> list[dict]:
        """``ray list <what> --detail`` (dead actors stay listed)."""
        cmd = [
            str(VENV_BIN / "ray"),
            "list",
            what,
            "--detail",
            "--format",
            "json",
            "--limit",
            "1000",
            "--address",
            self.dashboard,
        ]
        p = run(cmd, env=self.env, timeout=60)
        assert p.returncode == 0, tail(p.stdout + p.stderr)
        return json.loads(p.stdout)

    def stop(self) -> None:
        kill_marked(self.marker, grace=3.0)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = RayCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        left = pids_with_env(cluster.marker)
        assert not left, f"Ray processes of the test cluster survived: {left}"


def job_status(cluster: RayCluster, job_id: str) -> str:
    p = run([str(VENV_BIN / "ray"), "job", "status", "--address", cluster.dashboard, job_id], env=cluster.env)
    # "Job 'x' succeeded" / "Status for job 'x': RUNNING", depending on the state
    m = re.search(r"\b(PENDING|RUNNING|STOPPED|SUCCEEDED|FAILED)\b", p.stdout + p.stderr, re.IGNORECASE)
    return m.group(1).upper() if m else f"unknown: {tail(p.stdout + p.stderr, 500)}"


def submit_env(cluster: RayCluster, run_dir: Path) -> tuple[dict, str]:
    """The environment of deploy/ray/submit.sh for a job into ``run_dir`` that returns once submitted."""
    job_id = f"safesteer-test-{secrets.token_hex(4)}"
    env = {
        **cluster.env,
        "RAY_ADDRESS": cluster.dashboard,
        "SAFESTEER_OUTPUT_DIR": str(run_dir),
        "SAFESTEER_JOB_ID": job_id,
        "SAFESTEER_SUBMIT_ARGS": "--no-wait",
    }
    return env, job_id


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_places_actors_on_the_second_node(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    env, job_id = submit_env(ray_cluster, run_dir)
    overrides = [
        "+experiment=smoke",
        "eval.enabled=false",
        "+rollout.resources.node_b=1",
        "++learner.resources={node_b:1}",
        "+teacher.resources.head_node=1",
    ]
    p = run([str(DEPLOY / "ray" / "submit.sh"), *overrides], env=env, timeout=180)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    status, deadline = "PENDING", time.monotonic() + 420
    try:
        while time.monotonic() < deadline:
            status = job_status(ray_cluster, job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(3)
    finally:
        if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            run([str(VENV_BIN / "ray"), "job", "stop", "--address", ray_cluster.dashboard, job_id], env=env)
    logs = run(
        [str(VENV_BIN / "ray"), "job", "logs", "--address", ray_cluster.dashboard, job_id], env=env
    ).stdout
    assert status == "SUCCEEDED", f"job {job_id}: {status}\n{tail(logs)}"
    assert_artifacts(run_dir)

    # Where the actors ran, from the state API (the job's actors are dead by now, and still listed).
    actors = [
        a for a in ray_cluster.state("actors") if a.get("job_id") and a["class_name"].endswith("Worker")
    ]
    where: dict[str, set[str]] = {}
    for a in actors:
        where.setdefault(a["class_name"], set()).add(a["node_id"])
    node_b, head = ray_cluster.nodes["node_b"], ray_cluster.nodes["head"]
    assert where.get("RolloutWorker") == {node_b}, where
    assert where.get("LearnerWorker") == {node_b}, where
    assert where.get("TeacherWorker") == {head}, where
    assert len([a for a in actors if a["class_name"] == "LearnerWorker"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_stop_saves_the_step_in_flight(ray_cluster, tmp_path):
    """``ray job stop`` sends the driver SIGTERM; deploy/ray/runtime_env.yaml gives it time to end its
    step and save it before Ray's SIGKILL (no periodic checkpoints here)."""
    run_dir = tmp_path / "run"
    env, job_id = submit_env(ray_cluster, run_dir)
    ray = str(VENV_BIN / "ray")
    # twelve steps of about a second: `ray job status` polls are slower than a step
    many = (
        "trainer.prompts_per_step=2",
        "trainer.epochs=3",
        "trainer.max_steps=12",
        "stages=[prepare,distill]",
    )
    p = run(
        [str(DEPLOY / "ray" / "submit.sh"), "+experiment=smoke", *many, "trainer.checkpoint_every=0"], env=env
    )
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    try:
        assert wait_until(
            lambda: len(steps_done(run_dir)) >= 1 or job_status(ray_cluster, job_id) != "RUNNING", 420, 0.5
        )
        stop = run([ray, "job", "stop", "--address", ray_cluster.dashboard, job_id], env=env, timeout=400)
        assert stop.returncode == 0, tail(stop.stdout + stop.stderr)
        assert wait_until(lambda: job_status(ray_cluster, job_id) == "STOPPED", 60, 1.0)
    finally:
        run([ray, "job", "stop", "--no-wait", "--address", ray_cluster.dashboard, job_id], env=env)
    logs = run([ray, "job", "logs", "--address", ray_cluster.dashboard, job_id], env=env).stdout
    done = steps_done(run_dir)
    assert 1 <= len(done) < 12, (done, tail(logs))
    ck = run_dir / "checkpoints" / f"step-{done[-1]:06d}"
    assert f"SIGTERM: stopped during distill; saved checkpoint {ck}; resume with: " in logs, tail(logs)
    assert (ck / "COMPLETE").is_file() and "Traceback" not in logs


def distill_only_cli(tmp_path: Path, *overrides: str) -> list[str]:
    """The CLI up to placement, without the prepare stage (a made-up safety-token file)."""
    from safesteer.core.tokens import SafetyTokens

    tokens = tmp_path / "tokens.json"
    made_up = SafetyTokens([17, 42], ["a", "b"], [1.0, 1.0], [0.1, 0.1], [0.2, 0.2], "kl", 0.1, 0.2)
    tokens.write_text(json.dumps(dataclasses.asdict(made_up)))
    return [
        sys.executable,
        "-m",
        "safesteer.run",
        "+experiment=smoke",
        "cluster.address=auto",
        "stages=[distill]",
        f"tokens.path={tokens}",
        "teacher.kind=system_prompt",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_placement_timeout_names_the_missing_resources(ray_cluster, tmp_path):
    """The driver attached with cluster.address=auto gives up after cluster.placement_timeout_s, naming
    what no node offers (node_c) and the bundle no single node can hold (head_node and node_b together)."""
    cmd = distill_only_cli(
        tmp_path,
        "cluster.placement_timeout_s=5",
        "+rollout.resources.node_c=2",
        "++teacher.resources={node_b:1,head_node:1}",
    )
    t0 = time.monotonic()
    p = run(cmd, env={**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs}, timeout=240)
    took = time.monotonic() - t0
    assert p.returncode == 2, tail(p.stdout + p.stderr)
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error: the cluster cannot place the actors within 5s: missing {'node_c': 2.0}"), (
        err
    )
    assert "no single node can hold a bundle of rollout" in err and "teacher {'CPU': 1" in err, err
    assert "rollout x1" in err and "learner x2" in err, err
    assert took < 200, took


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_unreachable_cluster_address_fails_within_the_connect_timeout(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cmd = distill_only_cli(tmp_path, f"cluster.address=127.0.0.1:{port}", "cluster.connect_timeout_s=3")
    t0 = time.monotonic()
    p = run(cmd, env=env, timeout=150)
    assert p.returncode == 2, tail(p.stdout + p.stderr)
    err = p.stderr.strip().splitlines()[-1]
    assert (
        err
        == f"error: cluster.address=127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} within 3s"
    )
    assert time.monotonic() - t0 < 120


# ------------------------------------------------------------------------- a Slurm cluster on this host
@pytest.fixture(scope="module")
def slurm():
    """A running two-node Slurm on this host (started here when needed): (environment, node names)."""
    if os.environ.get("SAFESTEER_SKIP_SLURM") == "1":
        pytest.skip("SAFESTEER_SKIP_SLURM=1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env.update(
        SAFESTEER_SLURM_DIR=str(SLURM_DIR),
        SAFESTEER_SLURM_NODES="2",
        SLURM_CONF=str(SLURM_DIR / "slurm.conf"),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    script = str(DEPLOY / "slurm" / "local-test-cluster.sh")
    started = run([script, "status"], env=env).returncode != 0
    p = run([script, "start"], env=env, timeout=900)
    assert p.returncode == 0, (
        "could not start the local Slurm test cluster (needs root and apt-get, or slurm-wlm and munge "
        f"installed; set SAFESTEER_SKIP_SLURM=1 to opt out):\n{tail(p.stdout + p.stderr)}"
    )
    nodes = run([script, "nodes"], env=env).stdout.split()
    assert len(nodes) == 2, nodes
    try:
        yield env, nodes
    finally:
        if started:
            run([script, "stop"], env=env)


def sbatch_env(slurm_env: dict, out: Path, ray_tmp: Path) -> dict:
    """Parameters of safesteer.sbatch for a test job: private ports (both Slurm nodes share this host, so
    the head and the worker get different ones) and a custom resource `node_b` on the worker only."""
    out.mkdir(parents=True, exist_ok=True)  # Slurm opens --output=out/batch.out before the script runs
    port, dash, client, *agent = free_ports(11)
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")  # fmt: skip
    head_args = " ".join(f"--{n}={p}" for n, p in zip(names, agent[:4]))
    worker_args = " ".join(f"--{n}={p}" for n, p in zip(names, agent[4:]))
    return {
        **slurm_env,
        "SAFESTEER_OUTPUT_DIR": str(out),
        "SAFESTEER_RAY_TMPDIR": str(ray_tmp),
        "SAFESTEER_RAY_NUM_CPUS": "4",  # logical CPUs per node (2 real ones here)
        "SAFESTEER_RAY_PORT": str(port),
        "SAFESTEER_RAY_DASHBOARD_PORT": str(dash),
        "SAFESTEER_RAY_CLIENT_PORT": str(client),
        "SAFESTEER_RAY_HEAD_IP": "127.0.0.1",  # loopback only, as every Ray node of this test
        "SAFESTEER_RAY_HEAD_ARGS": head_args,
        "SAFESTEER_RAY_WORKER_ARGS": worker_args + ' --node-ip-address=127.0.0.1 --resources={"node_b":10}',
    }


# The rollout worker and both learner ranks can only run on the second node (the only one with node_b).
ON_WORKER_NODE = (
    "+rollout.resources.node_b=1",
    "++learner.resources={node_b:1}",
    "cluster.placement_timeout_s=120",
)


def sbatch_cmd(out: Path, name: str, *overrides: str, wait: bool) -> list[str]:
    return [
        "sbatch",
        *(["--wait"] if wait else ["--parsable"]),
        "--nodes=2",
        f"--job-name={name}",
        f"--output={out}/batch.out",
        str(DEPLOY / "slurm" / "safesteer.sbatch"),
        "+experiment=smoke",
        *ON_WORKER_NODE,
        *overrides,
    ]


def job_field(env: dict, job: str, key: str) -> str:
    p = run(["scontrol", "show", "job", job], env=env, timeout=30)
    m = re.search(rf"\b{key}=(\S+)", p.stdout)
    return m.group(1) if m else ""


def job_processes(job: str) -> list[int]:
    """Every process of Slurm job ``job`` (they all inherit SLURM_JOB_ID, whoever their parent is now)."""
    return pids_with_env(f"SLURM_JOB_ID={job}")


def wait_until(cond, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_sbatch_two_nodes_runs_the_pipeline_and_tears_ray_down(slurm, tmp_path):
    env, (head, worker) = slurm[0], slurm[1]
    out, ray_tmp = tmp_path / "run", short_tmpdir("sssl")
    env, name = sbatch_env(env, out, ray_tmp), f"safesteer-test-{secrets.token_hex(4)}"
    try:
        p = run(sbatch_cmd(out, name, wait=True), env=env, timeout=480)
        job = re.search(r"Submitted batch job (\d+)", p.stdout).group(1)
        batch_log, logs = read(out / "batch.out"), out / "logs"
        driver = read(logs / "driver.log")
        assert p.returncode == 0, f"{tail(p.stdout + p.stderr)}\n{tail(batch_log)}\n{tail(driver)}"
        assert job_field(env, job, "JobState") == "COMPLETED"
        assert job_field(env, job, "ExitCode") == "0:0"
        assert job_field(env, job, "NumNodes") == "2"
        assert_artifacts(out)
        assert (out / "report.md").is_file()  # evaluation ran too
        # The node steps may still be logging their exit when sbatch --wait returns: read once they are gone.
        left = [] if wait_until(lambda: not job_processes(job), 90) else job_processes(job)
        assert not left, f"processes of the finished job remain: {[cmdline(pid) for pid in left]}"
        head_log, worker_log = read(logs / f"ray-head-{head}.log"), read(logs / f"ray-worker-{worker}.log")
        assert "Ray runtime started" in head_log and "ray start ended" in head_log, tail(head_log)
        assert "Ray runtime started" in worker_log and "ray start ended" in worker_log, tail(worker_log)
        assert "2/2 nodes joined" in driver and "'node_b': 10.0" in driver and "done in" in driver, tail(
            driver
        )
        assert "teardown done" in batch_log, batch_log
        for node in (head, worker):  # the teardown step ran on every node
            assert (logs / f"ray-stop-{node}.log").is_file(), node
        assert not cmdlines_containing(str(ray_tmp))
    finally:  # nothing to do, unless the test failed midway
        run(["scancel", f"--name={name}"], env=env)
        kill_marked(f"SAFESTEER_RAY_TMPDIR={ray_tmp}")
        shutil.rmtree(ray_tmp, ignore_errors=True)


# Eight steps of two prompts (a second or two each), so that a job can be stopped mid-distill.
EIGHT_STEPS = (
    "trainer.prompts_per_step=2",
    "trainer.epochs=2",
    "trainer.max_steps=8",
    "stages=[prepare,distill,export]",
)


def steps_done(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.is_file() else []


def stop_mid_distill(env: dict, out: Path, ray_tmp: Path, name: str, scancel: list[str], *overrides: str):
    """Submit an eight-step job, ``scancel`` it once a step is done (and checkpointed, with
    ``trainer.checkpoint_every=1``), and wait until every process of the job is gone. Returns the job id."""
    p = run(sbatch_cmd(out, name, *EIGHT_STEPS, *overrides, wait=False), env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]

    def training() -> bool:
        assert job_field(env, job, "JobState") in ("PENDING", "RUNNING"), read(out / "batch.out")
        if "trainer.checkpoint_every=1" in overrides:
            return (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()
        return len(steps_done(out)) >= 1

    assert wait_until(training, 300, 0.2), f"no step done:\n{tail(read(out / 'logs' / 'driver.log'))}"
    assert run(["scancel", *scancel, job], env=env).returncode == 0

    def all_gone() -> bool:
        return not job_processes(job) and not cmdlines_containing(str(ray_tmp))

    assert wait_until(all_gone, 150), {p: cmdline(p) for p in job_processes(job)}
    return job


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_slurm_scancel_mid_distill_then_a_resubmission_resumes(slurm, tmp_path):
    """A plain scancel signals every process of the job, Ray's included: nothing is left, and the same
    job submitted again (the driver runs with trainer.resume=auto) resumes from the newest checkpoint."""
    env, (head, worker) = slurm[0], slurm[1]
    out, ray_tmp = tmp_path / "run", short_tmpdir("sssc")
    env, name = sbatch_env(env, out, ray_tmp), f"safesteer-test-{secrets.token_hex(4)}"
    try:
        job = stop_mid_distill(env, out, ray_tmp, name, [], "trainer.checkpoint_every=1")
        assert wait_until(lambda: job_field(env, job, "JobState") == "CANCELLED", 60)
        batch_log, driver = read(out / "batch.out"), read(out / "logs" / "driver.log")
        assert "received SIGTERM" in batch_log and "teardown done" in batch_log, batch_log
        for log in (f"ray-head-{head}.log", f"ray-worker-{worker}.log"):
            assert "signal: stopping Ray" in read(out / "logs" / log), log
        # the driver stops as the cluster goes down beneath it (at once, once its watchdog sees the GCS gone)
        assert re.search(r"SIGTERM: stopped (at once )?during distill; .*newest checkpoint", driver), tail(
            driver
        )
        assert "Traceback" not in driver, tail(driver)
        saved = sorted(d.name for d in (out / "checkpoints").iterdir() if not d.name.startswith("."))
        assert saved and len(steps_done(out)) < 8, (saved, steps_done(out))
        newest = int(saved[-1].split("-")[1])

        p = run(
            sbatch_cmd(out, name, *EIGHT_STEPS, "trainer.checkpoint_every=1", wait=True), env=env, timeout=480
        )
        driver = read(out / "logs" / "driver.log")
        assert p.returncode == 0, f"{tail(read(out / 'batch.out'))}\n{tail(driver)}"
        assert f"resumed from {out / 'checkpoints' / saved[-1]}: step {newest} of 8" in driver, tail(driver)
        assert steps_done(out) == list(range(1, 9))  # no duplicate, no gap
        assert (out / "export" / "model" / "model.safetensors").is_file()
    finally:
        run(["scancel", f"--name={name}"], env=env)
        kill_marked(f"SAFESTEER_RAY_TMPDIR={ray_tmp}")
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_slurm_usr1_to_the_batch_shell_saves_the_step_in_flight(slurm, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit) stops the
    driver alone: it ends its step and saves it (no periodic checkpoints here), then Ray is torn down."""
    env = slurm[0]
    out, ray_tmp = tmp_path / "run", short_tmpdir("ssu1")
    env, name = sbatch_env(env, out, ray_tmp), f"safesteer-test-{secrets.token_hex(4)}"
    try:
        stop_mid_distill(env, out, ray_tmp, name, ["--batch", "--signal=USR1"], "trainer.checkpoint_every=0")
        batch_log, driver = read(out / "batch.out"), read(out / "logs" / "driver.log")
        assert "received SIGUSR1" in batch_log and "the driver stopped (status 143)" in batch_log, batch_log
        assert "teardown done" in batch_log, batch_log
        done = steps_done(out)
        assert 1 <= len(done) < 8, done
        ck = out / "checkpoints" / f"step-{done[-1]:06d}"
        assert f"SIGTERM: stopped during distill; saved checkpoint {ck}; resume with: " in driver, tail(
            driver
        )
        assert "Traceback" not in driver, tail(driver)
        assert (ck / "COMPLETE").is_file()
        assert [d.name for d in (out / "checkpoints").iterdir()] == [ck.name]
    finally:
        run(["scancel", f"--name={name}"], env=env)
        kill_marked(f"SAFESTEER_RAY_TMPDIR={ray_tmp}")
        shutil.rmtree(ray_tmp, ignore_errors=True)
