"""Round schedules (docs/concepts/schedules.md): one_by_one is the authors' loop, exactly;
the parallel schedules train round-start vectors; every order is seeded, never the arrival order.

Clients here are scripted: client k "trains" theta to theta - 0.3 (theta - target_k) and
returns the delta 0.3 (theta - target_k), so what a client sends depends on the theta it got,
and an independent reimplementation can compute it too.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.clientapp import ClientApp

from common import protocol
from common.config import resolve_config
from server_app import hypernetwork_steps as steps
from server_app.run import build_strategy
from server_app.schedules import SCHEDULES, client_order
from simulation.grid import InProcessGrid
from tests.test_strategy import SMALL, proof_of

SIZES = {0: 40, 1: 40, 2: 100, 3: 40, 4: 100}  # two heads (tau 3 and 7 with N = 16)


def target(key: str, size: int) -> np.ndarray:
    seed = int(key[1:]) + 17
    return np.random.default_rng(seed).normal(0, 0.3, size).astype(np.float32)


def local_delta(key: str, theta: np.ndarray) -> np.ndarray:
    return (0.3 * (theta - target(key, theta.size))).astype(np.float32)


def pulling_app(received: list) -> ClientApp:
    """Scripted clients; `received` records (key, round, theta) of every train message."""
    app = ClientApp()

    def key_of(context) -> str:
        return f"c{context.node_config['partition-id']}"

    @app.query()
    def query(msg, context):
        i = context.node_config["partition-id"]
        reply = protocol.identity_reply(key_of(context), SIZES[i], proof=proof_of(key_of(context)))
        return Message(reply, reply_to=msg)

    @app.train()
    def train(msg, context):
        theta = protocol.read_theta(msg).copy()
        received.append((key_of(context), protocol.read_round(msg), theta))
        reply = protocol.train_reply(local_delta(key_of(context), theta), 10, 0.1)
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        return Message(protocol.evaluate_reply(protocol.EvalResult(10, 5, 1.0)), reply_to=msg)

    return app


def run(schedule: str, rounds: int = 2, node_order=None, seed: int = 0, **overrides):
    received: list = []
    cfg = resolve_config(
        "default",
        {**SMALL, "rounds": rounds, "seed": seed, "hypernetwork.schedule": schedule, **overrides},
    )
    order = list(SIZES) if node_order is None else node_order
    grid = InProcessGrid(pulling_app(received), [{"partition-id": i} for i in order], {})
    strategy = build_strategy(cfg)
    strategy.discover(grid, timeout=10)
    initial = copy.deepcopy(strategy.state)  # every client registered, nothing trained
    strategy.start(grid)
    return strategy, initial, received


def parameters(server) -> dict[str, torch.Tensor]:
    out = {f"hnet.{k}": v for k, v in server.hnet.state_dict().items()}
    for key in server.clients:
        out[f"emb.{key}"] = server.embedding(key).detach()
    return out


def plain_copy(initial):
    """A plain-PyTorch copy of a server state for the reference loops: (hypernetwork,
    sorted keys, embeddings, K per key, the parameters in the server's order, Adam)."""
    hnet = copy.deepcopy(initial.hnet)
    keys = sorted(initial.clients)
    embeddings = {k: initial.embedding(k).detach().clone().requires_grad_(True) for k in keys}
    size = {k: initial.record(k).num_params for k in keys}
    params = list(hnet.parameters()) + [embeddings[k] for k in keys]
    optimizer = torch.optim.Adam(params, lr=initial.settings.lr, fused=True)
    return hnet, keys, embeddings, size, params, optimizer


def plain_weights(hnet, embeddings) -> dict[str, torch.Tensor]:
    """The reference loop's result, named as `parameters` names the server's."""
    out = {f"hnet.{k}": v for k, v in hnet.state_dict().items()}
    out.update({f"emb.{k}": v.detach() for k, v in embeddings.items()})
    return out


def authors_loop(initial, rounds: int) -> dict[str, torch.Tensor]:
    """MH-pFedHN.py's round, written out in plain PyTorch on a copy of the initial weights:
    for client_id in the round's seeded order: weights = hnet(client_id); delta = train(...);
    grads = autograd.grad(weights, hnet.parameters(), grad_outputs=delta); clip; Adam step."""
    hnet, keys, embeddings, size, params, optimizer = plain_copy(initial)
    for server_round in range(1, rounds + 1):
        for key in client_order(initial.seed, keys, server_round):
            weights = hnet(embeddings[key])[: size[key]]
            delta = torch.from_numpy(local_delta(key, weights.detach().numpy()))
            grads = torch.autograd.grad(weights, params, grad_outputs=delta, allow_unused=True)
            optimizer.zero_grad(set_to_none=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            used = [p for p in params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(used, initial.settings.grad_clip)
            optimizer.step()
    return plain_weights(hnet, embeddings)


def test_one_by_one_is_the_authors_loop_bit_for_bit():
    strategy, initial, received = run("one_by_one", rounds=2)
    want = authors_loop(initial, rounds=2)
    got = parameters(strategy.state)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert len(received) == 2 * len(SIZES)
    # the test can fail: the parallel round ends elsewhere
    parallel, _, _ = run("parallel_sequential", rounds=2)
    assert not torch.equal(parameters(parallel.state)["hnet.feature_extractor.0.weight"],
                           want["hnet.feature_extractor.0.weight"])  # fmt: skip


def test_under_one_by_one_each_client_trains_what_the_steps_before_it_made():
    """The first client of the round gets the round-start theta; each later one gets exactly
    what the hypernetwork generates after the steps of the clients before it (also a client
    of another head: the feature extractor is shared, so every step moves every theta)."""
    strategy, initial, received = run("one_by_one", rounds=1)
    order = client_order(initial.seed, sorted(initial.clients), 1)
    assert [key for key, _, _ in received] == order
    replay = copy.deepcopy(initial)
    start = replay.generate(order)
    for position, (key, _, theta) in enumerate(received):
        assert np.array_equal(theta, replay.generate([key])[key]), key
        if position > 0:
            assert not np.array_equal(theta, start[key]), key
        steps.step_client(replay, key, local_delta(key, theta))
    first = order[0]
    assert np.array_equal(received[0][2], start[first])


@pytest.mark.parametrize("schedule", ["parallel_sequential", "parallel_mean"])
def test_parallel_schedules_train_the_round_start_thetas(schedule):
    strategy, initial, received = run(schedule, rounds=1)
    start = initial.generate(sorted(initial.clients))
    assert len(received) == len(SIZES)
    for key, _, theta in received:
        assert np.array_equal(theta, start[key]), key


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_order_is_seeded_not_the_order_nodes_connect_or_answer_in(schedule):
    a, _, _ = run(schedule, node_order=[0, 1, 2, 3, 4])
    b, _, _ = run(schedule, node_order=[4, 2, 0, 3, 1])
    pa, pb = parameters(a.state), parameters(b.state)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    if schedule != "parallel_mean":  # the mean has no order; another seed gives another one
        keys = sorted(a.state.clients)
        assert any(client_order(0, keys, r) != client_order(1, keys, r) for r in (1, 2))
