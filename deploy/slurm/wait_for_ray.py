"""Wait until a Ray cluster has N live nodes, or fail naming the nodes that did join.

    python deploy/slurm/wait_for_ray.py --address HEAD_IP:PORT --nodes 4 --timeout 300

Used by deploy/slurm/ray-node.sh before the driver starts. Exit status 0 when N nodes are alive,
1 on timeout (or when the head cannot be reached at all within the timeout).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _describe(nodes: list[dict]) -> str:
    out = []
    for n in nodes:
        res = {k: v for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}
        out.append(f"{n.get('NodeManagerHostname')}({n.get('NodeManagerAddress')}) {res}")
    return "; ".join(out) or "none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="GCS address HOST:PORT")
    ap.add_argument("--nodes", type=int, required=True, help="live nodes to wait for")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds")
    a = ap.parse_args()
    if not a.address:
        print("wait_for_ray: no --address and no RAY_ADDRESS", file=sys.stderr)
        return 2
    deadline = time.monotonic() + a.timeout
    while not _reachable(a.address):
        if time.monotonic() > deadline:
            print(
                f"wait_for_ray: the Ray head {a.address} is unreachable after {a.timeout:.0f}s",
                file=sys.stderr,
            )
            return 1
        time.sleep(1)

    import ray

    ray.init(address=a.address, logging_level="ERROR", log_to_driver=False)
    alive: list[dict] = []
    try:
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= a.nodes:
                print(f"wait_for_ray: {len(alive)}/{a.nodes} nodes joined: {_describe(alive)}", flush=True)
                return 0
            if time.monotonic() > deadline:
                print(
                    f"wait_for_ray: only {len(alive)}/{a.nodes} nodes joined within {a.timeout:.0f}s "
                    f"(joined: {_describe(alive)}); see the ray-worker-*.log files",
                    file=sys.stderr,
                )
                return 1
            time.sleep(2)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
