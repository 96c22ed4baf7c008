"""The README's worked example: a seventh method (FedAvgM) in one module plus one registry
entry, run end to end by the unchanged ServerApp and ClientApp code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client_app.app import app as client_app
from common import methods
from common.config import resolve_config
from server_app.run import run_experiment
from simulation.grid import InProcessGrid
from tests.tiny_runs import tiny_data

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "new_method"


def test_the_worked_example_method_runs_and_learns(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import fedavgm

    monkeypatch.setitem(methods.METHODS, fedavgm.METHOD.name, fedavgm.METHOD)
    run_cfg = {
        "method": "fedavgm",
        **tiny_data(tiny_npz, tmp_path, 3),
        "clients.models": "lenet",
        "client.lr": 0.05,
        "rounds": 3,
        "server.min_nodes": 3,
        "server.wait_for_nodes_s": 0,
        "server.output_root": str(tmp_path / "out"),
        "server.run_name": "fedavgm",
        "client.state_dir": str(tmp_path / "clients"),  # their secrets survive the restart
    }
    cfg = resolve_config("default", run_cfg)
    strategy = run_experiment(InProcessGrid.simulation(client_app, 3, run_cfg), cfg, "t")
    assert type(strategy).__name__ == "FedAvgM" and strategy.state.velocity is not None
    rows = strategy.history
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["clients_trained"] == 3 for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    # its state survives a checkpoint, velocity included
    resumed = resolve_config(
        "default", {**run_cfg, "rounds": 4, "server.resume": str(tmp_path / "out" / "fedavgm")}
    )
    again = run_experiment(InProcessGrid.simulation(client_app, 3, run_cfg), resumed, "t")
    assert [r["round"] for r in again.history] == [0, 1, 2, 3, 4]
    assert np.isfinite(again.state.velocity).all()
