"""TensorBoard and MLflow tracking: read back what a real run logged, once per round, also
when a run is interrupted after logging a round its checkpoint does not hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason='tracking needs pip install -e ".[tracking]"')
pytest.importorskip("tensorboard", reason='tracking needs pip install -e ".[tracking]"')

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from client_app.app import app as client_app  # noqa: E402
from common.config import ConfigError, resolve_config  # noqa: E402
from server_app.run import run_experiment  # noqa: E402
from server_app.tracking import TRACKING_FILE  # noqa: E402
from simulation.grid import InProcessGrid  # noqa: E402
from tests.tiny_runs import tiny_data


class Stop(Exception):
    pass


class StoppingGrid(InProcessGrid):
    """Stops the run at its first message after `metrics` has logged round `stop_after`."""

    stop_after: int | None = None
    metrics: Path | None = None

    def push_messages(self, messages):
        if self.stop_after is not None and self.metrics.exists():
            logged = [json.loads(line)["round"] for line in self.metrics.open()]
            if self.stop_after in logged:
                raise Stop
        return super().push_messages(messages)


def run(tiny_npz, tmp_path, rounds, **extra):
    run_cfg = {
        **tiny_data(tiny_npz, tmp_path, 3),
        "clients.models": "mlp",
        "rounds": rounds,
        "server.min_nodes": 3,
        "server.wait_for_nodes_s": 0,
        "server.output_root": str(tmp_path / "out"),
        "server.run_name": "tracked",
        "server.checkpoint_every": 2,
        "server.fuse_evaluation": False,
        "client.state_dir": str(tmp_path / "clients"),
        "tracking.backends": "tensorboard,mlflow",
        "tracking.tags": "experiment=tiny,method=mh_pfedhn,seed=0",
        **extra,
    }
    cfg = resolve_config("default", run_cfg)
    StoppingGrid.metrics = tmp_path / "out" / "tracked" / "metrics.jsonl"
    return run_experiment(StoppingGrid.simulation(client_app, 3, run_cfg), cfg, "t")


def tensorboard_steps(tmp_path, tag):
    events = EventAccumulator(str(tmp_path / "out" / "tracked" / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)], events


def mlflow_run(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "out" / "tracked" / TRACKING_FILE).read_text())
    return client, client.get_run(run_id["mlflow_run_id"])


def test_every_round_is_logged_once_and_a_resumed_run_adds_only_new_ones(tiny_npz, tmp_path):
    run(tiny_npz, tmp_path, rounds=2)
    steps, events = tensorboard_steps(tmp_path, "accuracy/pooled")
    assert steps == [0, 1, 2]
    assert {"loss/test", "bytes/down", "time/round_seconds", "clients/rejected_replies",
            "summary/final_accuracy"} <= set(events.Tags()["scalars"])  # fmt: skip
    assert events.Tags()["histograms"] == ["accuracy/per_client"]
    assert events.Tags()["images"] == ["accuracy_plot"]
    client, tracked = mlflow_run(tmp_path)
    history = client.get_metric_history(tracked.info.run_id, "accuracy/pooled")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert tracked.data.params["method"] == "mh_pfedhn" and tracked.data.params["seed"] == "0"
    assert tracked.data.tags["experiment"] == "tiny" and tracked.info.status == "FINISHED"
    assert {"client_accuracy/partition-0", "summary/best_accuracy"} <= set(tracked.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"accuracy.png", "summary.json", "config.yaml"} <= artifacts

    # continue to 5 rounds, but stop in round 4: round 3 is logged, the checkpoint is still
    # round 2's
    StoppingGrid.stop_after = 3
    resume = {"server.resume": str(tmp_path / "out" / "tracked")}
    try:
        with pytest.raises(Stop):
            run(tiny_npz, tmp_path, rounds=5, **resume)
    finally:
        StoppingGrid.stop_after = None
    rows = [json.loads(x) for x in (tmp_path / "out" / "tracked" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    run(tiny_npz, tmp_path, rounds=5, **resume)
    steps, _ = tensorboard_steps(tmp_path, "accuracy/pooled")
    assert steps == [0, 1, 2, 3, 4, 5]
    client, tracked = mlflow_run(tmp_path)
    history = client.get_metric_history(tracked.info.run_id, "accuracy/pooled")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 5]


def test_a_missing_tracking_library_is_a_clear_configuration_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError("no mlflow", name="mlflow")
        return real_import(name, *args, **kwargs)

    from server_app.tracking import trackers

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    cfg = resolve_config("default", {"tracking.backends": "mlflow"})
    with pytest.raises(
        ConfigError, match=r"mlflow is not installed: pip install -e \".\[tracking\]\""
    ):
        trackers(cfg, __import__("pathlib").Path("/tmp"))


def test_a_rounds_validation_figures_are_logged_beside_its_test_figures():
    from server_app.tracking import round_scalars

    row = {"accuracy": 0.8, "loss": 0.5, "val_accuracy": 0.7, "val_loss": 0.9, "rejected": []}
    assert round_scalars(row) == {
        "accuracy/pooled": 0.8,
        "loss/test": 0.5,
        "accuracy/validation": 0.7,
        "loss/validation": 0.9,
        "clients/rejected_replies": 0.0,
    }
