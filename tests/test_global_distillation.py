"""MH-pFedHNGD and its ablation without distillation: the global phase, its weighting,
distillation (paper 3.3)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message

from client_app.app import app as client_app
from client_app.data import load_client_data
from client_app.methods.mh_pfedhngd import distillation_loss
from client_app.spec import client_spec
from common import protocol
from common.config import resolve_config
from server_app import hypernetwork_steps as steps
from server_app.hypernetwork_server import HypernetworkSettings
from server_app.methods.mh_pfedhngd import GlobalModelHypernetwork, MHpFedHNGD
from server_app.run import build_state
from simulation.grid import InProcessGrid
from tests.test_client_app import send


# ------------------------------------------------------------------ the loss
def reference_distillation(student, teacher, labels, a, t):
    ce = -np.log(np.exp(student) / np.exp(student).sum(1, keepdims=True))[
        np.arange(len(labels)), labels
    ].mean()
    p_t = np.exp(teacher / t) / np.exp(teacher / t).sum(1, keepdims=True)
    p_s = np.exp(student / t) / np.exp(student / t).sum(1, keepdims=True)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean()  # batch mean of per-sample KL
    return (1 - a) * ce + a * t * t * kl


@pytest.mark.parametrize(("a", "t"), [(0.01, 15.0), (0.2, 24.0), (0.5, 1.0), (0.0, 10.0)])
def test_distillation_loss_equals_a_direct_computation(a, t):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (2, 8, 5))
    labels = rng.integers(0, 5, 8)
    got = distillation_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), a, t
    )
    assert float(got) == pytest.approx(reference_distillation(student, teacher, labels, a, t))


def test_distillation_loss_is_finite_for_extreme_logits():
    student = torch.tensor([[1e4, -1e4, 0.0], [-3e37, 3e37, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0], [3e37, -3e37, 0.0]])
    loss = distillation_loss(student, teacher, torch.tensor([0, 1]), 0.5, 15.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_without_a_teacher_weight_the_loss_is_cross_entropy():
    student, teacher = torch.randn(2, 6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    got = distillation_loss(student, teacher, labels, 0.0, 15.0)
    torch.testing.assert_close(got, F.cross_entropy(student, labels))


# ------------------------------------------------------- server: phase 1 step
SMALL = HypernetworkSettings(chunk_size=40, embedding_dim=8, hidden_dim=16, grad_clip=1e9)


def test_phase_one_is_one_step_on_the_data_weighted_vjps():
    server = GlobalModelHypernetwork(SMALL, seed=1)
    server.register("client", 100)
    server.register_global(100)
    twin = copy.deepcopy(server)
    d_a, d_b = np.random.default_rng(2).normal(size=(2, 100)).astype(np.float32)
    server.step_global([d_a, d_b], [2 / 3, 1 / 3])

    params = list(twin.hnet.feature_extractor.parameters())
    params += list(twin.hnet.head(3).parameters()) + [twin.embedding(twin.global_model)]
    optimizer = torch.optim.Adam(params, lr=twin.settings.lr)
    w_g = twin.hnet.generate(twin.embedding(twin.global_model), 100)
    loss = (2 / 3) * (w_g * torch.from_numpy(d_a)).sum() + (1 / 3) * (
        w_g * torch.from_numpy(d_b)
    ).sum()
    loss.backward()
    optimizer.step()
    for got, want in zip(server.hnet.parameters(), twin.hnet.parameters(), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        server.embedding(server.global_model), twin.embedding(twin.global_model)
    )
    assert torch.equal(server.embedding("client"), twin.embedding("client"))


def test_a_client_with_twice_the_data_pulls_twice_as_hard():
    """Equal deltas, m_A = 2 m_B: A's share of the phase-1 gradient is twice B's."""
    server = GlobalModelHypernetwork(SMALL, seed=1)
    glob = server.register_global(100)
    delta = torch.from_numpy(np.random.default_rng(3).normal(size=100).astype(np.float32))
    full = steps.gradients(server, [(glob, delta * (2 / 3))])
    half = steps.gradients(server, [(glob, delta * (1 / 3))])
    for p in full:
        torch.testing.assert_close(full[p], 2 * half[p])


def test_global_model_shares_the_head_of_clients_with_its_tau():
    server = GlobalModelHypernetwork(seed=0)
    lenet = server.register("lenet-client", 234006)
    glob = server.register_global(234006)
    assert glob.tau == lenet.tau == 77
    assert sorted(server.hnet.heads) == ["tau77"]
    assert glob.embedding_name != lenet.embedding_name


def test_client_keys_cannot_take_the_global_models_name():
    server = GlobalModelHypernetwork(SMALL, seed=0)
    with pytest.raises(ValueError, match="reserved"):
        server.register("__global__", 100)


# --------------------------------------------------- whole rounds, real clients
def gd_setup(tiny_npz, tmp_path, num_nodes=4, **extra):
    overrides = {
        "method": "mh_pfedhngd",
        "data.source": f"npz:{tiny_npz}",
        "data.classes_per_client": 2,
        "data.cache_dir": str(tmp_path / "cache"),
        "data.normalize": "none",
        "clients.models": "lenet,mlp",
        "client.epochs": 1,
        "rounds": 2,
        "server.min_nodes": num_nodes,
        "server.wait_for_nodes_s": 0,
        **extra,
    }
    cfg = resolve_config("default", overrides)
    grid = InProcessGrid.simulation(client_app, num_nodes, {"experiment": "default", **overrides})
    return MHpFedHNGD(build_state(cfg), cfg), grid


class Recorder:
    """Wraps the grid's ClientApp to record which messages each node received."""

    def __init__(self, grid):
        self.seen: list[tuple[int, str, dict]] = []
        inner = grid.client_app

        def call(message: Message, context):
            config = dict(message.content["config"]) if message.has_content() else {}
            self.seen.append((context.node_id, message.metadata.message_type, config))
            return inner(message, context)

        grid.client_app = call

    def nodes(self, message_type):
        return sorted({n for n, t, _ in self.seen if t == message_type})


def test_gd_round_runs_both_phases_and_reports_global_accuracy(tiny_npz, tmp_path):
    strategy, grid = gd_setup(tiny_npz, tmp_path)
    seen = Recorder(grid)
    strategy.start(grid)
    row = strategy.history[-1]
    assert row["global_clients_trained"] == 4 and row["clients_trained"] == 4
    assert 0.0 <= row["global_accuracy"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    assert set(row["global_client_accuracy"]) == set(row["client_accuracy"])
    assert seen.nodes(protocol.TRAIN_GLOBAL) == seen.nodes(protocol.TRAIN) == sorted(grid.contexts)
    distilled = [c for _, t, c in seen.seen if t == protocol.TRAIN]
    assert all(c["distill"] and c["teacher"] == "round_start" for c in distilled)
    assert all(c["temperature"] == 15.0 and c["distill-weight"] == 0.01 for c in distilled)
    # lenet clients and the lenet global model share one head; mlp has its own
    assert len(strategy.state.hnet.heads) == 2
    k_g = strategy.state.global_model.num_params
    lenet = strategy.state.record("partition-0")
    assert lenet.num_params == k_g


def test_global_embeddings_move_only_in_phase_one(tiny_npz, tmp_path, monkeypatch):
    strategy, grid = gd_setup(tiny_npz, tmp_path, rounds=1)
    snapshots = {}
    original_phase = MHpFedHNGD.global_phase

    def phase(self, grid, server_round, keys, timeout):
        snapshots["before"] = self.state.embedding(self.state.global_model).detach().clone()
        out = original_phase(self, grid, server_round, keys, timeout)
        snapshots["after"] = self.state.embedding(self.state.global_model).detach().clone()
        return out

    monkeypatch.setattr(MHpFedHNGD, "global_phase", phase)
    strategy.start(grid)
    assert not torch.equal(snapshots["before"], snapshots["after"])
    assert torch.equal(strategy.state.embedding(strategy.state.global_model), snapshots["after"])


def test_phase_one_weights_are_the_clients_example_counts(tiny_npz, tmp_path, monkeypatch):
    strategy, grid = gd_setup(tiny_npz, tmp_path, rounds=1)
    seen = {}
    original = strategy.state.step_global

    def capture(deltas, weights):
        seen["weights"] = list(weights)
        return original(deltas, weights)

    monkeypatch.setattr(strategy.state, "step_global", capture)
    strategy.start(grid)
    counts = [
        len(load_client_data(client_spec(c.node_config, strategy.cfg), strategy.cfg.seed).y_train)
        for c in grid.contexts.values()
    ]
    assert len(set(counts)) > 1, "the test needs clients of different sizes"
    assert sorted(seen["weights"]) == pytest.approx(sorted(c / sum(counts) for c in counts))


def test_clients_outside_the_global_fraction_get_no_phase_one_message(tiny_npz, tmp_path):
    strategy, grid = gd_setup(tiny_npz, tmp_path, rounds=1, **{"global_model.fraction": 0.5})
    seen = Recorder(grid)
    strategy.start(grid)
    in_phase1 = seen.nodes(protocol.TRAIN_GLOBAL)
    assert len(in_phase1) == 2
    for node, message_type, config in seen.seen:
        if message_type == protocol.TRAIN:
            assert bool(config.get("distill")) == (node in in_phase1)
    assert strategy.history[-1]["global_clients_trained"] == 2
    assert strategy.history[-1]["clients_trained"] == 4


@pytest.mark.parametrize("teacher", ["round_start", "regenerated", "phase1_trained"])
def test_each_teacher_choice_runs_and_only_regenerated_sends_more(teacher, tiny_npz, tmp_path):
    strategy, grid = gd_setup(tiny_npz, tmp_path, rounds=1, **{"global_model.teacher": teacher})
    strategy.start(grid)
    row = strategy.history[-1]
    assert row["clients_trained"] == 4 and not row["rejected"]
    k_g = strategy.state.global_model.num_params
    personal = sum(strategy.state.record(k).num_params for k in strategy.directory.node_of)
    # personal train + evaluate, global train + evaluate, (+ a teacher per distilling client)
    expected = 4 * (2 * personal + 2 * 4 * k_g)
    if teacher == "regenerated":
        expected += 4 * 4 * k_g
    assert row["bytes_down"] == expected


def test_without_distillation_phase_two_is_mh_pfedhns_client_update(tiny_npz, tmp_path):
    """Given the same theta, an MH-pFedHNG client (after its phase 1) returns MH-pFedHN's delta."""
    deltas = {}
    for method in ("mh_pfedhn", "mh_pfedhngd_no_distill"):
        strategy, grid = gd_setup(tiny_npz, tmp_path / method, num_nodes=2, method=method)
        context = grid.contexts[1000]
        k = protocol.read_config(send(protocol.QUERY, context))[protocol.NUM_PARAMS]
        theta = np.random.default_rng(0).normal(0, 0.05, k).astype(np.float32)
        if method == "mh_pfedhngd_no_distill":
            k_g = protocol.read_config(send(protocol.QUERY, context))[protocol.GLOBAL_NUM_PARAMS]
            w_g = np.random.default_rng(1).normal(0, 0.05, k_g)
            send(protocol.TRAIN_GLOBAL, context, w_g.astype(np.float32))
        reply = send(protocol.TRAIN, context, theta)
        deltas[method] = protocol.parse_train_reply(reply, k).delta
    assert np.array_equal(deltas["mh_pfedhn"], deltas["mh_pfedhngd_no_distill"])
