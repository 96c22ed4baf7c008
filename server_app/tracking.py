"""Experiment tracking: every run can log to TensorBoard event files and to MLflow.

Chosen with `tracking.backends` (none by default; `pip install -e ".[tracking]"` brings both
libraries). Each is an observer of the run (server_app/events.py), so the ServerApp and
in-process runs log alike. What is logged: the resolved config (MLflow params, TensorBoard
hparams and text), per round the pooled and client-mean accuracy, loss, global-model and
novel/training accuracy where present, seconds, bytes, server update time, clients trained and
rejected replies, each client's accuracy (a histogram; per-client series in MLflow), then the
final and best accuracy with their rounds and the accuracy plot.

A resumed run continues its tracked run: TensorBoard purges what an earlier attempt logged
from the first new round on, and MLflow (whose run id is kept in the run directory) skips the
rounds it already has, so no round appears twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, ExperimentConfig, defining_settings
from server_app.events import RunObserver

TRACKING_FILE = "tracking.json"  # the MLflow run id of this run directory

#: metrics.jsonl key -> the name it is logged under
SCALARS = {
    "accuracy": "accuracy/pooled",
    "accuracy_client_mean": "accuracy/client_mean",
    "global_accuracy": "accuracy/global_model",
    "novel_accuracy": "accuracy/novel_clients",
    "training_accuracy": "accuracy/training_clients",
    "val_accuracy": "accuracy/validation",
    "loss": "loss/test",
    "val_loss": "loss/validation",
    "train_loss": "loss/train",
    "global_train_loss": "loss/train_global_model",
    "seconds": "time/round_seconds",
    "server_update_seconds": "time/server_update_seconds",
    "bytes_down": "bytes/down",
    "bytes_up": "bytes/up",
    "clients_trained": "clients/trained",
    "clients_evaluated": "clients/evaluated",
}
SUMMARY = (
    "final_accuracy", "final_round", "best_accuracy", "best_round", "selected_accuracy",
    "selected_round", "total_seconds",
)  # fmt: skip
HPARAMS = (  # the settings a sweep varies, as TensorBoard's hparams columns
    "method", "seed", "data.source", "data.partitioner", "clients.models",
    "hypernetwork.schedule", "hypernetwork.embedding_std", "hypernetwork.lr", "client.lr",
    "client.epochs", "rounds",
)  # fmt: skip


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers under their logged names (missing or None ones left out)."""
    out = {SCALARS[k]: float(row[k]) for k in SCALARS if isinstance(row.get(k), (int, float))}
    out["clients/rejected_replies"] = float(len(row.get("rejected", [])))
    return out


def parse_tags(tags: Sequence[str]) -> dict[str, str]:
    """`key=value` strings as a dict (what the sweep runner passes: experiment, method, seed)."""
    out = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"tracking.tags: {tag!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def trackers(cfg: ExperimentConfig, run_dir: Path) -> list[RunObserver]:
    """The observers for cfg.tracking.backends, or a ConfigError saying what to install."""
    out: list[RunObserver] = []
    for backend in cfg.tracking.backends:
        try:
            if backend == "tensorboard":
                out.append(TensorBoardTracker(cfg, run_dir))
            else:
                out.append(MLflowTracker(cfg, run_dir))
        except ImportError as err:
            raise ConfigError(
                f"tracking.backends has {backend!r}, but {err.name} is not installed: "
                'pip install -e ".[tracking]"'
            ) from None
    return out


class TensorBoardTracker(RunObserver):
    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.cfg = cfg
        self.directory = Path(cfg.tracking.tensorboard_dir or run_dir / "tensorboard")
        self.writer_class = SummaryWriter
        self.writer = None
        self.plot = run_dir / "accuracy.png"

    def run_started(self, cfg: ExperimentConfig, first_round: int, num_rounds: int) -> None:
        resumed = first_round > 0 and self.directory.is_dir()
        # purge_step: a resumed run hides what an interrupted attempt wrote from here on
        self.writer = self.writer_class(str(self.directory), purge_step=first_round or None)
        if not resumed:
            from torch.utils.tensorboard.summary import hparams

            values = {**hparam_values(cfg), **parse_tags(cfg.tracking.tags)}
            metrics = {"summary/final_accuracy": 0.0, "summary/best_accuracy": 0.0}
            experiment, start, _ = hparams(values, metrics)
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(start)
            text = json.dumps(defining_settings(cfg), indent=1).replace("\n", "\n    ")
            self.writer.add_text("config", "    " + text, 0)

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        step = row["round"]
        for name, value in round_scalars(row).items():
            self.writer.add_scalar(name, value, step)
        per_client = list((row.get("client_accuracy") or {}).values())
        if per_client:
            self.writer.add_histogram("accuracy/per_client", np.asarray(per_client), step)
        self.writer.flush()

    def run_finished(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = int(summary.get("rounds", 0))
        for key in ("final_accuracy", "best_accuracy"):
            if key in summary:
                self.writer.add_scalar(f"summary/{key}", summary[key], step)
        for key in ("final_round", "best_round"):
            if key in summary:
                self.writer.add_scalar(f"summary/{key}", summary[key], step)
        *_, end = hparams({}, {})
        self.writer.file_writer.add_summary(end)
        if self.plot.is_file():
            import matplotlib.image

            image = matplotlib.image.imread(self.plot)[..., :3]
            self.writer.add_image("accuracy_plot", image, step, dataformats="HWC")
        self.writer.close()


class MLflowTracker(RunObserver):
    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        from mlflow import MlflowClient  # needs the mlflow package

        root = Path(cfg.server.output_root).expanduser().resolve()
        self.uri = cfg.tracking.mlflow_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts = str(root / "mlartifacts")
        self.client = MlflowClient(tracking_uri=self.uri)
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = ""
        self.logged_up_to = -1  # rounds an earlier attempt of this run already logged

    def run_started(self, cfg: ExperimentConfig, first_round: int, num_rounds: int) -> None:
        saved = self.run_dir / TRACKING_FILE
        known = json.loads(saved.read_text()).get("mlflow_run_id") if saved.is_file() else None
        if known and first_round > 0:
            self.run_id = known
            history = self.client.get_metric_history(known, SCALARS["seconds"])
            self.logged_up_to = max((m.step for m in history), default=-1)
            self.client.update_run(known, status="RUNNING")
            return
        name = cfg.tracking.experiment or cfg.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(name, artifact_location=self.artifacts)
        )
        tags = {"mlflow.runName": self.run_dir.name, **parse_tags(cfg.tracking.tags)}
        run = self.client.create_run(experiment_id, tags=tags)
        self.run_id = run.info.run_id
        saved.write_text(json.dumps({"mlflow_run_id": self.run_id, "uri": self.uri}) + "\n")
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in defining_settings(cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        from mlflow.entities import Metric

        step = row["round"]
        if step <= self.logged_up_to:
            return
        now = int(time.time() * 1000)
        values = round_scalars(row)
        for key, accuracy in (row.get("client_accuracy") or {}).items():
            values[f"client_accuracy/{_metric_name(key)}"] = float(accuracy)
        metrics = [Metric(name, value, now, step) for name, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def run_finished(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(summary.get("rounds", 0))
        metrics = [Metric(f"summary/{k}", float(summary[k]), now, step)
                   for k in SUMMARY if isinstance(summary.get(k), (int, float))]  # fmt: skip
        self.client.log_batch(self.run_id, metrics=metrics)
        for name in ("accuracy.png", "summary.json", "config.yaml"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id)


def hparam_values(cfg: ExperimentConfig) -> dict[str, Any]:
    flat = {**defining_settings(cfg), "rounds": cfg.rounds}
    out = {}
    for key in HPARAMS:
        value = flat.get(key)
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _metric_name(key: str) -> str:
    """A client key as a metric name MLflow always accepts, one per key: a plain key (letters,
    digits, _ and -) as it is; any other with its other characters as _ and a hash of the
    key, so that `a+b` and `a_b` stay apart and nothing like `x/../y` reaches a path."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,100}", key):
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', key)[:80]}-{digest}"
