"""The metric logger backends write what they are given, read back from their own local stores, offline."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
import threading
from unittest import mock

import pytest

from safesteer.errors import SafeSteerError
from safesteer.loggers import open_backends

STEPS = (10, 20, 30)
# Exact in float32 (TensorBoard); "step", bools, None and strings are not metrics.
ROWS = [
    {"step": s, "loss": 0.5 / 2**i, "n": i + 3, "ok": True, "gone": None, "name": "x"}
    for i, s in enumerate(STEPS)
]
EXPECTED = {"loss": [(10, 0.5), (20, 0.25), (30, 0.125)], "n": [(10, 3), (20, 4), (30, 5)]}
CONFIG = {"project": "proj", "lr": 1e-4, "learner": {"steps": 3}}


@pytest.fixture(autouse=True)
def restore_environ():
    """The backends set their offline/telemetry variables process-wide; keep them out of other tests."""
    with mock.patch.dict(os.environ):
        yield


def write_run(backend_name, run_dir):
    [backend] = open_backends([backend_name], run_dir, "r1", CONFIG)
    for row, step in zip(ROWS, STEPS):
        backend.log(row, step)
    backend.close()


def _is_loopback(host) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_network(monkeypatch):
    """Non-loopback connects and name look-ups raise and are recorded; any HTTP(S) client that honours
    the proxy variables (Python's, and the Go of wandb's ``wandb-core`` child) reaches a trap instead."""
    attempts: list = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family != socket.AF_UNIX and not _is_loopback(address[0]):
            attempts.append(address)
            raise OSError(f"test forbids network: connect to {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host):
            attempts.append(host)
            raise socket.gaierror(f"test forbids network: resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = trap.accept()
            except TimeoutError:
                continue
            attempts.append(("proxy", conn.recv(200)))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{trap.getsockname()[1]}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    stop.set()
    thread.join()
    trap.close()


def test_tensorboard_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run("tensorboard", tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(EXPECTED)
    for key, expected in EXPECTED.items():
        assert [(e.step, e.value) for e in events.Scalars(key)] == expected


def wandb_records(path):
    """The protobuf records of a ``.wandb`` transaction log: a LevelDB-style log of 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_wandb_writes_an_offline_run(tmp_path, no_network):
    write_run("wandb", tmp_path)
    [log] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(log))
    [run] = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name) == ("proj", "r1")
    got: dict[str, list] = {}
    for r in records:
        if r.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    got.setdefault(key, []).append((r.history.step.num, value))
    assert got == EXPECTED
    assert no_network == []


def test_mlflow_writes_a_local_file_store(tmp_path, no_network):
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY
    from mlflow.tracking import MlflowClient

    write_run("mlflow", tmp_path)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("proj")
    [run] = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("r1", "FINISHED")
    assert sorted(run.data.metrics) == sorted(EXPECTED)
    for key, expected in EXPECTED.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == expected
    assert no_network == []
    assert MLFLOW_DISABLE_TELEMETRY.get()  # pytest alone would hide telemetry: mlflow skips it under tests


def test_unknown_backend_is_refused_before_anything_is_opened(tmp_path):
    with pytest.raises(SafeSteerError) as e:
        open_backends(["tensorboard", "neptune"], tmp_path, "r1", {})
    assert str(e.value) == (
        "logger.backends=['tensorboard', 'neptune']: unknown backend 'neptune'; "
        "choose from tensorboard, wandb, mlflow"
    )
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize(
    "name, module, package",
    [
        ("tensorboard", "tensorboard", "tensorboard"),
        ("wandb", "wandb", "wandb"),
        ("mlflow", "mlflow", "mlflow-skinny"),
    ],
)
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    with pytest.raises(SafeSteerError, match=f"needs the '{package}' package: pip install {package}$"):
        open_backends([name], tmp_path, "r1", {})
