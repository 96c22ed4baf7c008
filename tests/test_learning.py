"""MH-pFedHN learns on real data: the generated parameters themselves get accurate.

Real ClientApps and the real Strategy, run through the in-process grid on MNIST (a setting
of the project's fact sheet: 5 clients, lenet/vgg8/mlp, non-IID_1, 25% of the data, 1 local
epoch). Accuracy is that of theta_i as the hypernetwork emits it, before any local training.
"""

from __future__ import annotations

import pytest

from client_app.app import app as client_app
from common.config import resolve_config
from server_app.outputs import read_metrics
from server_app.run import run_experiment
from simulation.grid import InProcessGrid

# A wrong-sign, missing or misrouted update leaves theta_i near chance on the client's
# classes; the fact sheet's reference implementation reached 0.84 after 6 rounds here.
THRESHOLD = 0.70


def mnist_run(mnist_npz, tmp_path, **extra):
    overrides = {
        "data.source": f"npz:{mnist_npz}",
        "data.fraction": 0.25,
        "data.cache_dir": str(tmp_path / "cache"),
        "clients.models": "lenet,vgg8,mlp",
        "client.epochs": 1,
        "rounds": 6,
        "server.output_root": str(tmp_path),
        "server.run_name": "mnist",
        "server.min_nodes": 5,
        **extra,
    }
    cfg = resolve_config("default", overrides)
    grid = InProcessGrid.simulation(client_app, 5, {"experiment": "default", **overrides})
    strategy = run_experiment(grid, cfg, run_id="test")
    return strategy, read_metrics(tmp_path / "mnist" / "metrics.jsonl")


@pytest.mark.slow
def test_generated_parameters_rise_from_chance_to_accurate(mnist_npz, tmp_path):
    strategy, rows = mnist_run(mnist_npz, tmp_path)
    assert [r["round"] for r in rows] == list(range(7))
    assert rows[0]["accuracy"] < 0.3, "untrained hypernetwork should be near chance"
    assert rows[-1]["accuracy"] > THRESHOLD, [round(r["accuracy"], 3) for r in rows]
    assert rows[-1]["clients_trained"] == 5 and not rows[-1]["rejected"]
    assert len(strategy.state.hnet.heads) == 3  # lenet, vgg8, mlp have three taus
    assert (tmp_path / "mnist" / "config.yaml").is_file()
    assert (tmp_path / "mnist" / "summary.json").is_file()


def _wrong_sign(server, key, delta):
    return [(key, -delta)]


def _missing(server, key, delta):
    return []


def _misrouted(server, key, delta):
    """The delta goes to another client with the same K (the clients' classes differ)."""
    same = sorted(k for k, r in server.clients.items() if r.num_params == len(delta))
    return [(same[(same.index(key) + 1) % len(same)], delta)]


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", [_wrong_sign, _missing, _misrouted], ids=lambda f: f.__name__)
def test_a_broken_update_cannot_reach_the_threshold(sabotage, mnist_npz, tmp_path, monkeypatch):
    """The threshold above is only meaningful if broken updates stay below it (the default
    schedule, one_by_one, steps client by client)."""
    from server_app.schedules import OneByOne

    original = OneByOne.apply

    def broken(self, server, deltas, server_round):
        for key, delta in deltas.items():
            for target, changed in sabotage(server, key, delta):
                original(self, server, {target: changed}, server_round)
        return original(self, server, {}, server_round)

    monkeypatch.setattr(OneByOne, "apply", broken)
    _, rows = mnist_run(mnist_npz, tmp_path)
    assert max(r["accuracy"] for r in rows) < THRESHOLD, [round(r["accuracy"], 3) for r in rows]
