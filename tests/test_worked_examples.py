"""The two worked examples of adding a method (docs/adding-a-method.md), each one module and one
registry entry: FedAvgM (server momentum, a server-side setting) and FedProx (a client-side
proximal term with its `mu`). Each is checked against what it must reduce to, and run end to
end by the unchanged ServerApp and ClientApp code (under `flwr run` in
tests/test_flower_simulation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client_app.app import app as client_app
from client_app.methods.fedprox import ProximalTerm
from common.config import resolve_config
from server_app.methods.fedavgm import FedAvgMServer
from server_app.run import run_experiment
from simulation.grid import InProcessGrid
from tests.tiny_runs import tiny_data


def run(tiny_npz, tmp_path, name: str, rounds: int = 3, **settings):
    run_cfg = {
        **tiny_data(tiny_npz, tmp_path, 3),
        "clients.models": "lenet",
        "client.lr": 0.05,
        "client.batch_size": 16,  # 4 local steps: a proximal term acts from the second on
        "rounds": rounds,
        "server.min_nodes": 3,
        "server.wait_for_nodes_s": 0,
        "server.output_root": str(tmp_path / "out"),
        "server.run_name": name,
        "client.state_dir": str(tmp_path / name / "clients"),
        **settings,
    }
    cfg = resolve_config("default", run_cfg)
    return run_experiment(InProcessGrid.simulation(client_app, 3, run_cfg), cfg, "t")


def test_fedavgm_steps_by_the_momentum_of_the_mean_deltas():
    server = FedAvgMServer(seed=0, max_params=100, momentum=0.5)
    server.weights = np.zeros(3, np.float32)
    first, second = np.array([1.0, 0, 0]), np.array([0, 2.0, 0])
    server.step(first)
    server.step(second)
    velocity = 0.5 * first + second  # v1 = d1, v2 = beta v1 + d2
    np.testing.assert_allclose(server.weights, -first - velocity)


def test_fedavgm_without_momentum_is_fedavg_and_with_it_learns_and_resumes(tiny_npz, tmp_path):
    plain = run(tiny_npz, tmp_path, "fedavg", rounds=6, method="fedavg")
    still = run(tiny_npz, tmp_path, "m0", rounds=6, method="fedavgm", **{"fedavgm.momentum": 0})
    assert np.array_equal(plain.state.weights, still.state.weights)
    whole = run(tiny_npz, tmp_path, "whole", rounds=6, method="fedavgm")  # momentum 0.9
    assert all(r["clients_trained"] == 3 for r in whole.history[1:])
    assert whole.history[-1]["loss"] < plain.history[-1]["loss"] < plain.history[0]["loss"]
    run(tiny_npz, tmp_path, "split", rounds=3, method="fedavgm")
    resume = {"server.resume": str(tmp_path / "out" / "split")}
    resumed = run(tiny_npz, tmp_path, "split", rounds=6, method="fedavgm", **resume)
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3, 4, 5, 6]
    assert np.array_equal(resumed.state.weights, whole.state.weights)
    assert np.array_equal(resumed.state.velocity, whole.state.velocity)


def test_the_proximal_term_adds_mu_times_the_distance_to_the_received_weights():
    """Its gradient, from an independent computation: CE's plus mu (w - w_received)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    term = ProximalTerm(0.7, anchor)
    loss = term(model, x, model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ce = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for g, c, p, a in zip(grads, ce, model.parameters(), anchor, strict=True):
        torch.testing.assert_close(g, c + 0.7 * (p.detach() - a))


@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_fedprox_is_fedavg_at_mu_zero_and_pulls_towards_the_global_model_above(
    mu, tiny_npz, tmp_path
):
    plain = run(tiny_npz, tmp_path, "fedavg", method="fedavg")
    prox = run(tiny_npz, tmp_path, f"prox{mu}", method="fedprox", **{"fedprox.mu": mu})
    same = np.array_equal(plain.state.weights, prox.state.weights)
    assert same == (mu == 0.0)
    assert all(r["clients_trained"] == 3 for r in prox.history[1:])
    assert prox.history[-1]["loss"] < prox.history[0]["loss"]
    if mu:  # the proximal term keeps the round's move smaller than FedAvg's
        start = run(tiny_npz, tmp_path, "start", rounds=1, method="fedavg")
        one = run(tiny_npz, tmp_path, "prox-one", rounds=1, method="fedprox",
                  **{"fedprox.mu": 10.0})  # fmt: skip
        initial = start.history  # both start from the clients' identical seeded vector
        assert initial[0]["accuracy"] == one.history[0]["accuracy"]
        moved_avg = np.linalg.norm(start.state.weights - prox_initial(tiny_npz, tmp_path))
        moved_prox = np.linalg.norm(one.state.weights - prox_initial(tiny_npz, tmp_path))
        assert moved_prox < moved_avg


def prox_initial(tiny_npz, tmp_path) -> np.ndarray:
    """w_0: the seeded initial vector every LeNet client of this data reports."""
    from client_app.session import open_session
    from common.param_vector import model_to_vector

    grid = InProcessGrid.simulation(client_app, 3, {**tiny_data(tiny_npz, tmp_path, 3),
                                                    "clients.models": "lenet"})  # fmt: skip
    context = next(iter(grid.contexts.values()))
    return model_to_vector(open_session(context).model()).numpy()
