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
from server_app import hypernetwork_steps as steps
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
    server.register_with_initial("a", 4, w0)
    server.register_with_initial("b", 4, None)  # w_0 is already known
    d_a, d_b = np.array([1, 0, 0, 4], np.float32), np.array([0, 2, 0, -4], np.float32)
    server.step(server.mean_delta({"a": d_a, "b": d_b}, {"a": 30, "b": 10}))
    np.testing.assert_allclose(server.weights, w0 - (0.75 * d_a + 0.25 * d_b), rtol=1e-6)
    assert {k: v.tobytes() for k, v in server.generate(["a", "b"]).items()} == {
        "a": server.weights.tobytes(),
        "b": server.weights.tobytes(),
    }


def test_fedavg_refuses_a_second_architecture_and_a_missing_initial_vector():
    server = FedAvgServer(seed=0, max_params=10**6)
    with pytest.raises(RegistrationError, match="initial"):
        server.register_with_initial("a", 4, None)
    assert not server.clients
    server.register_with_initial("a", 4, np.zeros(4, np.float32))
    with pytest.raises(RegistrationError, match="one architecture"):
        server.register_with_initial("b", 5, np.zeros(5, np.float32))
    assert list(server.clients) == ["a"]


def test_pfedhn_has_one_head_per_tensor_and_generates_a_loadable_model():
    model = build_model("lenet", num_classes=10, in_channels=3)
    sizes = [p.numel() for p in model.parameters()]
    server = PFedHNServer(SETTINGS, seed=0)
    for key in ("a", "b"):
        server.set_tensor_sizes(key, sizes)
        server.register(key, sum(sizes))
    heads = server.heads_of("a").heads
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
    steps.step_client(server, "a", np.ones(234006, np.float32))
    assert torch.equal(server.embedding("b"), before_b)
    with pytest.raises(RegistrationError, match="other tensor sizes"):
        server.set_tensor_sizes("a", sizes[:-1])


def _pfedhn_client(server, key, arch):
    model = build_model(arch, num_classes=10, in_channels=3)
    sizes = [p.numel() for p in model.parameters()]
    server.set_tensor_sizes(key, sizes)
    server.register(key, sum(sizes))
    return model


def test_pfedhn_gives_each_architecture_its_own_heads_on_one_feature_extractor():
    """The paper's heterogeneous pFedHN (section 4.3: "adding multiple heads")."""
    server = PFedHNServer(SETTINGS, seed=0)
    models = {key: _pfedhn_client(server, key, arch) for key, arch in
              [("a", "lenet"), ("b", "mlp"), ("c", "lenet"), ("d", "mlp")]}  # fmt: skip
    assert len(server.architectures) == 2 and server.heads_of("a") is server.heads_of("c")
    assert server.heads_of("a") is not server.heads_of("b")
    theta = server.generate(list(models))
    for key, model in models.items():
        vector_to_model(model, theta[key])
        assert torch.isfinite(model(torch.zeros(1, 3, 32, 32))).all()
    mlp_heads = {n: p.detach().clone() for n, p in server.heads_of("b").named_parameters()}
    extractor = [p.detach().clone() for p in server.hnet.feature_extractor.parameters()]
    steps.step_client(server, "a", np.ones(theta["a"].size, np.float32))
    # a LeNet client's step moves the shared extractor, never the MLP's heads
    assert all(torch.equal(p, mlp_heads[n]) for n, p in server.heads_of("b").named_parameters())
    assert any(not torch.equal(p, q) for p, q in
               zip(server.hnet.feature_extractor.parameters(), extractor, strict=True))  # fmt: skip
    with pytest.raises(RegistrationError, match="does not match"):
        server.set_tensor_sizes("e", [5, 5])
        server.register("e", 11)
    assert "e" not in server.sizes_of and "e" not in server.clients  # refused, nothing kept
    assert len(server.architectures) == 2


def test_pfedhn_with_several_architectures_resumes_bit_for_bit(tmp_path):
    """Heads are made as their first client registers, interleaved with the embeddings; the
    checkpoint must rebuild the optimizer's parameter groups in that order."""
    from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    def fresh():
        server = PFedHNServer(SETTINGS, seed=0)
        for key, arch in [("a", "lenet"), ("b", "lenet"), ("c", "mlp"), ("d", "lenet")]:
            _pfedhn_client(server, key, arch)
        return server

    def step_rounds(server, rounds):
        for r in rounds:
            for key in ("a", "c", "d"):
                theta = server.generate([key])[key]
                steps.step_client(server, key, np.sin(np.arange(theta.size, dtype=np.float32) * r))

    whole = fresh()
    step_rounds(whole, [1, 2])
    split = fresh()
    step_rounds(split, [1])
    save_checkpoint(tmp_path / "pfedhn.pt", Checkpoint(split, 1, []))
    resumed = load_checkpoint(tmp_path / "pfedhn.pt", PFedHNServer).server
    step_rounds(resumed, [2])
    assert resumed.architectures == whole.architectures
    for key in "abcd":
        assert np.array_equal(resumed.generate([key])[key], whole.generate([key])[key])


def test_a_single_architecture_pfedhn_checkpoint_still_loads():
    server = PFedHNServer(SETTINGS, seed=0)
    server.set_tensor_sizes("a", [6, 2])
    server.register("a", 8)
    state = server.state_dict()
    state["tensor_sizes"] = list(state.pop("sizes_of")["a"])  # as the old version wrote it
    loaded = PFedHNServer.from_state_dict(state)
    assert np.array_equal(loaded.generate(["a"])["a"], server.generate(["a"])["a"])


ONE_MODEL = {"clients.models": "lenet"}  # default.yaml has two; some methods take one


def tiny_run(method, tiny_npz, tmp_path, rounds=2, models="lenet", node_models=("",) * 3):
    """node_models: a SuperNode's own `model` (node config) per node, "" for clients.models."""
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
        {"partition-id": i, "num-partitions": 3, "message-log": str(logs[i]), "model": model}
        for i, model in enumerate(node_models)
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
    """A site whose own model (its node config) differs from the others' is refused; the
    simulated assignment cannot name two (tests/test_config.py)."""
    nodes = ("", "mlp", "")
    strategy, _ = tiny_run("fedavg", tiny_npz, tmp_path, rounds=1, node_models=nodes)
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


def test_pfedhn_runs_with_heterogeneous_clients(tiny_npz, tmp_path):
    strategy, _ = tiny_run("pfedhn", tiny_npz, tmp_path, models="lenet,mlp")
    assert not strategy.directory.refused and len(strategy.state.architectures) == 2
    assert strategy.history[-1]["clients_trained"] == 3
    assert strategy.history[-1]["accuracy"] > strategy.history[0]["accuracy"]


@pytest.mark.parametrize(
    ("method", "kind"),
    [("local", "LocalServer"), ("fedavg", "FedAvgServer"), ("pfedhn", "PFedHNServer")],
)
def test_build_state_picks_the_methods_state(method, kind):
    assert (
        type(build_state(resolve_config("default", {"method": method, **ONE_MODEL}))).__name__
        == kind
    )


def test_baseline_states_survive_a_checkpoint(tmp_path):
    from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    fedavg = FedAvgServer(seed=0, max_params=10**6)
    fedavg.register_with_initial("a", 4, np.arange(4, dtype=np.float32))
    pfedhn = PFedHNServer(SETTINGS, seed=0)
    pfedhn.set_tensor_sizes("a", [6, 2])
    pfedhn.register("a", 8)
    steps.step_client(pfedhn, "a", np.ones(8, np.float32))
    for server in (fedavg, pfedhn):
        path = tmp_path / f"{type(server).__name__}.pt"
        save_checkpoint(path, Checkpoint(server, 1, []))
        loaded = load_checkpoint(path, type(server)).server
        assert np.array_equal(loaded.generate(["a"])["a"], server.generate(["a"])["a"])
    with pytest.raises(ValueError, match="holds a FedAvgServer"):
        load_checkpoint(tmp_path / "FedAvgServer.pt", PFedHNServer)


@pytest.mark.parametrize("method", ["fedakt", "fedavg", "mh_pfedhn"])
def test_the_message_log_has_every_vector_a_client_receives(method, tiny_npz, tmp_path):
    """An operator's audit trail (node config message-log) lists evaluate vectors as well as
    train ones (FedAKT's evaluation skipped it)."""
    _, received = tiny_run(method, tiny_npz, tmp_path)
    kinds = {(entry["round"], entry["type"]) for entry in received}
    assert {(1, "train"), (2, "train"), (2, "evaluate")} <= kinds, kinds
