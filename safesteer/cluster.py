"""Ray plumbing: the cluster connection, one placement group for all roles, and actor handles.

Roles (rollout workers, teachers, learner ranks) each get a bundle of the placement group with the
resources named in their config group (``num_cpus``, ``num_gpus``, custom ``resources``). Placement
waits at most ``cluster.placement_timeout_s`` and then names what is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from safesteer.errors import SafeSteerError
from safesteer.schema import option


@dataclass
class Placement:
    """What one actor of a group asks Ray for (the ``rollout``, ``teacher`` and ``learner`` groups)."""

    num_cpus: float = option(ge=0)
    num_gpus: float = option(ge=0)
    threads: int = option(ge=1)
    resources: dict[str, float] = option(default={})


@dataclass
class ClusterConfig:
    """``cluster``: where the actors run (conf/cluster)."""

    address: str | None = option()
    num_cpus: float | None = option(gt=0)
    include_dashboard: bool = option()
    dashboard_host: str = option()
    connect_timeout_s: float = option(gt=0)
    placement_timeout_s: float = option(gt=0)
    strategy: str = option(choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


def configure_threads(n: int) -> None:
    """Pin torch/OpenMP threads inside an actor (Ray sets 1 for fractional CPU requests)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(max(1, int(n)))


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a no-op).
    A learner step or an engine's weight reload frees gigabytes of temporaries (activations,
    per-layer copies) that glibc would otherwise keep resident while the other roles work."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")  # runs ldconfig: once per process
    return ctypes.CDLL(name) if name else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Role:
    name: str
    count: int
    num_cpus: float
    num_gpus: float
    resources: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)

    def bundle(self) -> dict:
        b = {"CPU": self.num_cpus, **{k: float(v) for k, v in self.resources.items()}}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        return b


def _reachable(address: str, timeout_s: float) -> bool:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1)


def cluster_check() -> Callable[[], bool]:
    """A check of whether the connected Ray cluster's GCS still accepts connections."""
    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")

    def alive() -> bool:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            return False

    return alive


def connect(cluster: ClusterConfig, roles: list[Role], run_env: dict) -> None:
    """Attach to ``cluster.address`` or start an embedded local Ray sized for ``roles``."""
    if ray.is_initialized():
        return
    address = cluster.address
    runtime_env = {"env_vars": run_env}
    if address:
        # ray.init retries an unreachable GCS for many minutes: check host:port first, within a bound.
        gcs = os.environ.get("RAY_ADDRESS", "") if address == "auto" else str(address)
        wait_s = float(cluster.connect_timeout_s)
        if re.fullmatch(r"[\w.-]+:\d+", gcs) and not _reachable(gcs, wait_s):
            raise SafeSteerError(
                f"cluster.address={address}: no Ray cluster answers at {gcs} within {wait_s:.0f}s"
            )
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SafeSteerError(
                f"cluster.address={address}: cannot reach a Ray cluster ({' '.join(str(e).split())[:200]})"
            ) from e
        return
    need = sum(r.num_cpus * r.count for r in roles)
    num_cpus = cluster.num_cpus or max(1, int(-(-need // 1)))
    custom: dict[str, float] = {}
    for r in roles:
        for k, v in r.resources.items():
            custom[k] = custom.get(k, 0.0) + float(v) * r.count
    ray.init(
        address="local",  # always a new embedded instance, never a cluster that happens to run here
        _node_ip_address="127.0.0.1",  # and on loopback only
        num_cpus=num_cpus,
        num_gpus=None,
        resources=custom or None,
        include_dashboard=cluster.include_dashboard,
        dashboard_host=cluster.dashboard_host,
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def placement(roles: list[Role], strategy: str, timeout_s: float):
    """One placement group, a bundle per actor; returns ``(pg, {role: [bundle indices]})``."""
    bundles, index = [], {}
    for r in roles:
        index[r.name] = list(range(len(bundles), len(bundles) + r.count))
        bundles += [r.bundle() for _ in range(r.count)]
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        total: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        avail = ray.available_resources()
        missing = {k: v - avail.get(k, 0.0) for k, v in total.items() if avail.get(k, 0.0) < v}
        # A bundle must fit on one node: enough in total is not enough when no single node has it.
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        unfit = [
            f"{r.name} {r.bundle()}"
            for r in roles
            if r.count and not any(all(n.get(k, 0.0) >= v for k, v in r.bundle().items()) for n in nodes)
        ]
        ray.util.remove_placement_group(pg)
        want = ", ".join(f"{r.name} x{r.count} {r.bundle()}" for r in roles)
        what = f"missing {missing}" if missing else f"enough in total, but not as strategy {strategy} asks"
        if unfit:
            what += f"; no single node can hold a bundle of {', '.join(unfit)}"
        raise SafeSteerError(
            f"the cluster cannot place the actors within {timeout_s:.0f}s: {what} "
            f"(asked for {want}; available {dict(sorted(avail.items()))})"
        )
    return pg, index


def spawn(cls, pg, bundle_index: int, role: Role, *args, **kwargs):
    """Create actor ``cls`` in bundle ``bundle_index`` of ``pg``."""
    env = {
        "OMP_NUM_THREADS": str(role.env.get("threads", 1)),
        **{k: str(v) for k, v in role.env.items() if k != "threads"},
    }
    return (
        ray.remote(cls)
        .options(
            num_cpus=role.num_cpus,
            num_gpus=role.num_gpus,
            resources=role.resources or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=bundle_index
            ),
            runtime_env={"env_vars": env},
            max_concurrency=1,
        )
        .remote(*args, **kwargs)
    )
