"""Baselines: FedAvg's weighted mean, pFedHN's per-tensor heads, Local's silence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client_app.app import app as client_app
from common.config import resolve_config
from common.models import build_model
from common.param_vector import vector_size, vector_to_model
from server_app.hypernetwork_server import HypernetworkSettings
from server_app.methods.fedavg import FedAvgServer
from server_app.methods.pfedhn import PFedHNServer
from server_app.run import build_state, run_experiment
from server_app.server_state import RegistrationError
from simulation.grid import InProcessGrid

SETTINGS = HypernetworkSettings(embedding_dim=8, hidden_dim=16)


def test_fedavg_steps_by_the_example_weighted_mean_of_deltas():
    server = FedAvgServer(seed=0, max_params=10**6)
    w0 = np.arange(4, dtype=np.float32)
    server.admit("a", 4, w0)
    server.admit("b", 4, None)  # w_0 is already known
    d_a, d_b = np.array([1, 0, 0, 4], np.float32), np.array([0, 2, 0, -4], np.float32)
    server.apply_deltas({"a": d_a, "b": d_b}, 1, weights={"a": 30, "b": 10})
    np.testing.assert_allclose(server.weights, w0 - (0.75 * d_a + 0.25 * d_b), rtol=1e-6)
    assert {k: v.tobytes() for k, v in server.generate(["a", "b"]).items()} == {
        "a": server.weights.tobytes(),
        "b": server.weights.tobytes(),
    }


def test_fedavg_refuses_a_second_architecture_and_a_missing_initial_vector():
    server = FedAvgServer(seed=0, max_params=10**6)
    with pytest.raises(RegistrationError, match="initial"):
        server.admit("a", 4, None)
    assert not server.clients
    server.admit("a", 4, np.zeros(4, np.float32))
    with pytest.raises(RegistrationError, match="one architecture"):
        server.admit("b", 5, np.zeros(5, np.float32))
    assert list(server.clients) == ["a"]


def test_pfedhn_has_one_head_per_tensor_and_generates_a_loadable_model():
    model = build_model("lenet", num_classes=10, in_channels=3)
    sizes = [p.numel() for p in model.parameters()]
    server = PFedHNServer(SETTINGS, seed=0)
    server.set_tensor_sizes(sizes)
    server.register("a", sum(sizes))
    server.register("b", sum(sizes))
    heads = server.hnet.heads[PFedHNServer.HEAD].heads
    assert (
        [h.out_features for h in heads]
        == sizes
        == [432, 16, 4608, 32, 221184, 108, 6912, 64, 640, 10]
    )
    theta = server.generate(["a", "b"])
    assert theta["a"].shape == (234006,) and not np.array_equal(theta["a"], theta["b"])
    vector_to_model(model, theta["a"])  # every tensor gets its own head's output
    assert torch.isfinite(model(torch.zeros(1, 3, 32, 32))).all()
    before_b = server.embedding("b").detach().clone()
    server.apply_deltas({"a": np.ones(234006, np.float32)}, 1)
    assert torch.equal(server.embedding("b"), before_b)
    with pytest.raises(RegistrationError):
        server.set_tensor_sizes(sizes[:-1])


def tiny_run(method, tiny_npz, tmp_path, rounds=2, models="lenet"):
    logs = [tmp_path / f"received-{i}.jsonl" for i in range(3)]
    overrides = {
        "method": method,
        "data.source": f"npz:{tiny_npz}",
        "data.classes_per_client": 2,
        "data.cache_dir": str(tmp_path / "cache"),
        "clients.models": models,
        "client.epochs": 1,
        "client.lr": 0.05,
        "rounds": rounds,
        "server.min_nodes": 3,
        "server.wait_for_nodes_s": 0,
        "server.output_root": str(tmp_path),
        "server.run_name": method,
    }
    nodes = [
        {"partition-id": i, "num-partitions": 3, "message-log": str(logs[i])} for i in range(3)
    ]
    grid = InProcessGrid(client_app, nodes, {"experiment": "default", **overrides})
    strategy = run_experiment(grid, resolve_config("default", overrides), run_id=0)
    received = [json.loads(x) for log in logs if log.exists() for x in log.read_text().splitlines()]
    return strategy, received


def test_local_never_communicates_parameters(tiny_npz, tmp_path):
    strategy, received = tiny_run("local", tiny_npz, tmp_path, rounds=3)
    rows = strategy.history
    assert received == []  # no client ever got a vector
    assert all(r["bytes_down"] == r["bytes_up"] == 0 for r in rows)
    assert all(r["clients_trained"] == 3 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]  # but each client did learn


def test_fedavg_sends_everyone_the_same_model_each_round(tiny_npz, tmp_path):
    strategy, received = tiny_run("fedavg", tiny_npz, tmp_path)
    by_round: dict[tuple, set] = {}
    for entry in received:
        by_round.setdefault((entry["round"], entry["type"]), set()).add(entry["sha256"])
    assert all(len(hashes) == 1 for hashes in by_round.values())
    assert by_round[(1, "train")] != by_round[(2, "train")]
    assert strategy.history[-1]["clients_trained"] == 3


def test_fedavg_refuses_heterogeneous_clients(tiny_npz, tmp_path):
    strategy, _ = tiny_run("fedavg", tiny_npz, tmp_path, rounds=1, models="lenet,mlp")
    assert len(strategy.state.clients) == 2 and len(strategy.directory.refused) == 1
    assert "one architecture" in next(iter(strategy.directory.refused.values())).reason


def test_pfedhn_runs_with_personalised_vectors(tiny_npz, tmp_path):
    strategy, received = tiny_run("pfedhn", tiny_npz, tmp_path)
    train_round_one = {e["client_key"]: e["sha256"] for e in received if e["round"] == 1}
    assert len(set(train_round_one.values())) == 3  # each client its own vector
    assert isinstance(strategy.state, PFedHNServer)
    k = vector_size(build_model("lenet", num_classes=4, in_channels=1))
    assert all(r.num_params == k for r in strategy.state.clients.values())
    assert strategy.history[-1]["clients_trained"] == 3


@pytest.mark.parametrize(
    ("method", "kind"),
    [("local", "LocalServer"), ("fedavg", "FedAvgServer"), ("pfedhn", "PFedHNServer")],
)
def test_build_state_picks_the_methods_state(method, kind):
    assert type(build_state(resolve_config("default", {"method": method}))).__name__ == kind


def test_baseline_states_survive_a_checkpoint(tmp_path):
    from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    fedavg = FedAvgServer(seed=0, max_params=10**6)
    fedavg.admit("a", 4, np.arange(4, dtype=np.float32))
    pfedhn = PFedHNServer(SETTINGS, seed=0)
    pfedhn.set_tensor_sizes([6, 2])
    pfedhn.register("a", 8)
    pfedhn.apply_deltas({"a": np.ones(8, np.float32)}, 1)
    for server in (fedavg, pfedhn):
        path = tmp_path / f"{type(server).__name__}.pt"
        save_checkpoint(path, Checkpoint(server, 1, []))
        loaded = load_checkpoint(path, type(server)).server
        assert np.array_equal(loaded.generate(["a"])["a"], server.generate(["a"])["a"])
    with pytest.raises(ValueError, match="holds a FedAvgServer"):
        load_checkpoint(tmp_path / "FedAvgServer.pt", PFedHNServer)
