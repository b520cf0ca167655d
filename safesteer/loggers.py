"""Metric logger backends; none of them reaches the network.

``open_backends(names, run_dir, run_name, config)`` gives one :class:`Backend` per name, each with
``log(row, step)`` (every int/float value of ``row`` except ``"step"``; bools and None are skipped)
and ``close()``.

- ``tensorboard``: event files in ``run_dir/tensorboard``; view with
  ``tensorboard --logdir run_dir/tensorboard``.
- ``wandb``: a Weights & Biases run in offline mode, in ``run_dir/wandb/offline-run-*`` (no login,
  no console capture, no git/code/system-metrics collection, no error reports); upload it later
  with ``wandb sync run_dir/wandb/offline-run-*``.
- ``mlflow``: an MLflow local file store in ``run_dir/mlruns`` (tracking URI ``file:``), experiment
  ``config.get("project", "safesteer")``, MLflow's usage telemetry off; the config is the run's
  ``config.json`` artifact. View with
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:run_dir/mlruns`` (the UI needs
  the full ``mlflow`` package) or read it back with ``MlflowClient``.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from safesteer.errors import SafeSteerError


class Backend(Protocol):
    def log(self, row: dict, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict) -> dict[str, int | float]:
    """The numeric values of ``row`` except ``"step"``: ints and floats (numpy scalars too), no bools."""
    return {
        k: v
        for k, v in row.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # optional logger backend

        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```")

    def log(self, row: dict, step: int) -> None:
        for key, value in scalars(row).items():
            self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self._writer.close()


class Wandb:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        # Offline whatever the environment says: no login prompt, no upload, no sentry error reports.
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false")
        import wandb  # optional logger backend

        settings = wandb.Settings(
            mode="offline",
            silent=True,
            console="off",
            save_code=False,
            disable_code=True,
            disable_git=True,
            disable_job_creation=True,
            x_disable_stats=True,  # no system-metrics sampler (its settings include a cloud-metadata URL)
            x_disable_machine_info=True,
        )
        self._run = wandb.init(
            project=config.get("project", "safesteer"),
            name=run_name,
            dir=str(run_dir),
            config=config,
            mode="offline",
            settings=settings,
            reinit="create_new",
        )

    def log(self, row: dict, step: int) -> None:
        self._run.log(scalars(row), step=step)

    def close(self) -> None:
        import wandb  # optional logger backend

        self._run.finish()
        # finish() only tells wandb's service process that the run is over; the service closes the
        # run's .wandb file later. teardown() waits for the service to exit, so the file is complete
        # when the run's stage ends (a `wandb sync` or a reader right after sees every record).
        wandb.teardown()


class MLflow:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        # No usage telemetry (read when mlflow is imported); allow the file store, which MLflow 3.x keeps
        # in maintenance mode and refuses without this opt-in.
        os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_ALLOW_FILE_STORE="true")
        from mlflow.tracking import MlflowClient  # optional logger backend

        self.tracking_uri = (run_dir / "mlruns").resolve().as_uri()
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        project = config.get("project", "safesteer")
        experiment = self._client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(project)
        self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        self._client.log_text(self.run_id, json.dumps(config, indent=2, default=str), "config.json")

    def log(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric  # optional logger backend

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now_ms, step) for key, value in scalars(row).items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


# name -> (class, module that must be importable, pip package)
BACKENDS = {
    "tensorboard": (TensorBoard, "tensorboard", "tensorboard"),
    "wandb": (Wandb, "wandb", "wandb"),
    "mlflow": (MLflow, "mlflow", "mlflow-skinny"),
}


def open_backends(names: Sequence[str], run_dir: Path, run_name: str, config: dict) -> list[Backend]:
    """Open the named backends for one run (all names and packages are checked before any is opened)."""
    for name in names:
        if name not in BACKENDS:
            raise SafeSteerError(
                f"logger.backends={list(names)}: unknown backend {name!r}; choose from {', '.join(BACKENDS)}"
            )
        _, module, package = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise SafeSteerError(
                f"logger backend {name!r} needs the {package!r} package: pip install {package}"
            )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opened: list[Backend] = []
    try:
        for name in names:
            opened.append(BACKENDS[name][0](run_dir, run_name, config))
    except BaseException:
        for backend in opened:
            backend.close()
        raise
    return opened
