"""Every round schedule keeps the rest working: partial participation, novel clients joining
a frozen hypernetwork, top-p uploads, local and frozen layers, and a checkpoint resumed after
the join that continues bit for bit."""

from __future__ import annotations

import pytest

from client_app.app import app as client_app
from common.config import resolve_config
from server_app.run import run_experiment
from server_app.schedules import SCHEDULES
from simulation.grid import InProcessGrid
from tests.tiny_runs import tiny_data

CLIENTS = 5
# timings, and what a last round's own evaluation exchange adds (rows agree on the rest)
TIMING = {"seconds", "server_update_seconds", "server_seconds_per_client_update",
          "exchange_seconds", "client_seconds", "exchanges", "bytes_down"}  # fmt: skip


def run(tiny_npz, tmp_path, schedule, name, rounds, **extra):
    run_cfg = {
        **tiny_data(tiny_npz, tmp_path, CLIENTS),
        "clients.models": "lenet",
        "clients.local_layers": "none,classifier.5.*",
        "clients.frozen_layers": "none,none,classifier.3.*",
        "client.upload": "top_p",
        "client.epochs": 1,
        "client.state_dir": str(tmp_path / name / "clients"),
        "hypernetwork.hidden_dim": 8,
        "hypernetwork.schedule": schedule,
        "generalization.join_round": 2,
        "generalization.novel_clients": 1,
        "server.fraction_train": 0.75,
        "server.min_nodes": CLIENTS,
        "server.wait_for_nodes_s": 0,
        "server.output_root": str(tmp_path / "out"),
        "server.run_name": name,
        "rounds": rounds,
        **extra,
    }
    cfg = resolve_config("default", run_cfg)
    return run_experiment(InProcessGrid.simulation(client_app, CLIENTS, run_cfg), cfg, name)


IN_FLIGHT = [  # (schedule, in_flight, vjp_at): clients in flight, both ways of their VJP
    ("one_by_one", 3, "current"),
    ("one_by_one", 2, "generated"),
    ("cohorts", 2, "generated"),
]


@pytest.mark.parametrize(
    ("schedule", "in_flight", "vjp_at"),
    [(s, 1, "current") for s in SCHEDULES if s != "cohorts"] + IN_FLIGHT,
)
def test_every_schedule_keeps_the_features_and_resumes_bit_for_bit(
    schedule, in_flight, vjp_at, tiny_npz, tmp_path
):
    flight = {"hypernetwork.in_flight": in_flight, "hypernetwork.vjp_at": vjp_at}
    whole = run(tiny_npz, tmp_path, schedule, "whole", rounds=4, **flight).history
    assert [r["round"] for r in whole] == [0, 1, 2, 3, 4]
    assert [r["clients_trained"] for r in whole[1:]] == [3, 3, 1, 1]  # 75% of 4, then novel
    assert whole[-1]["novel_clients"] == 1 and whole[-1]["novel_accuracy"] is not None
    dense_up = 4 * 233_718  # a whole LeNet delta would be this many bytes
    assert all(r["bytes_up"] < dense_up * r["clients_trained"] for r in whole[1:])
    if in_flight > 1:  # three clients train: all of them are in flight at once
        assert [r["clients_in_flight"] for r in whole[1:3]] == [min(3, in_flight)] * 2
    run(tiny_npz, tmp_path, schedule, "split", rounds=3, **flight)
    resume = {"server.resume": str(tmp_path / "out" / "split")}
    split = run(tiny_npz, tmp_path, schedule, "split", rounds=4, **flight, **resume).history
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in split]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in whole]
