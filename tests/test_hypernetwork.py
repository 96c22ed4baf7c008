"""The hypernetwork and the rules of its server state (docs/concepts/hypernetwork.md)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.param_vector import num_chunks
from server_app import hypernetwork_steps as steps
from server_app.hypernetwork import MultiHeadHypernetwork
from server_app.hypernetwork_server import HypernetworkServer, HypernetworkSettings
from server_app.memory import resolve_device
from server_app.schedules import client_order, schedule_named
from server_app.server_state import RegistrationError

SMALL = HypernetworkSettings(chunk_size=50, embedding_dim=8, hidden_dim=16, hidden_layers=3)


def apply(server, deltas, server_round):
    """A parallel round's deltas as steps, by the server's schedule."""
    return schedule_named(server.settings.schedule).apply(server, deltas, server_round)


def small_server(max_params: int = 50_000_000, **overrides) -> HypernetworkServer:
    settings = HypernetworkSettings(**{**SMALL.__dict__, **overrides})
    return HypernetworkServer(settings, seed=3, max_params=max_params)


def test_tau_is_ceil_of_k_over_n():
    assert num_chunks(3072, 3072) == 1
    assert num_chunks(3073, 3072) == 2
    assert num_chunks(234006, 3072) == 77
    assert num_chunks(565386, 3072) == 185


def test_clients_with_same_tau_share_a_head_and_others_get_their_own():
    server = small_server()
    a = server.register("a", 120)  # tau 3
    b = server.register("b", 101)  # tau 3
    c = server.register("c", 40)  # tau 1
    assert a.tau == b.tau == 3 and c.tau == 1
    assert sorted(server.hnet.heads) == ["tau1", "tau3"]
    assert server.embedding("a").shape == (3, 8)
    assert server.embedding("c").shape == (1, 8)
    theta = server.generate(["a", "b", "c"])
    assert {k: v.shape for k, v in theta.items()} == {"a": (120,), "b": (101,), "c": (40,)}
    assert all(v.dtype == np.float32 for v in theta.values())


def test_batched_generation_equals_a_per_chunk_reference():
    hnet = MultiHeadHypernetwork(chunk_size=30, embedding_dim=8, hidden_dim=16, hidden_layers=3)
    head = hnet.add_head(4)
    embeddings = torch.randn(4, 8)
    reference = []
    for j in range(4):  # the authors' formulation: one Linear per chunk, applied one by one
        feature = hnet.feature_extractor(embeddings[j])
        reference.append(F.linear(feature, head.weight[j].T, head.bias[j]))
    expected = torch.cat(reference)[:100]
    torch.testing.assert_close(hnet.generate(embeddings, 100), expected, rtol=1e-6, atol=1e-6)
    # and a stack of clients in one call equals each client alone
    stacked = torch.stack([embeddings, embeddings * 2])
    torch.testing.assert_close(hnet(stacked)[1], hnet(embeddings * 2), rtol=1e-6, atol=1e-6)


def test_feature_extractor_has_the_authors_shape():
    hnet = MultiHeadHypernetwork()
    assert sum(p.numel() for p in hnet.feature_extractor.parameters()) == 41_344
    assert sum(p.numel() for p in hnet.add_head(1).parameters()) == 396_288


def test_vjp_equals_autograd_through_inner_product_loss():
    server = small_server()
    server.register("a", 120)
    server.register("b", 40)
    delta = torch.randn(120)
    grads = steps.gradients(server, [(server.record("a"), delta)])
    # explicit loss <theta(phi), delta>
    theta = server.hnet.generate(server.embedding("a"), 120)
    params = list(grads)
    expected = torch.autograd.grad((theta * delta).sum(), params)
    for got, want in zip(grads.values(), expected, strict=True):
        torch.testing.assert_close(got, want)
    involved = {id(p) for p in params}
    assert id(server.embedding("b")) not in involved
    assert all(id(p) not in involved for p in server.hnet.head(1).parameters())


def test_one_update_is_clip_then_adam_on_the_inner_product_loss():
    server = small_server(grad_clip=0.5)
    twin = copy.deepcopy(server)
    server.register("a", 120)
    twin.register("a", 120)
    delta = np.random.default_rng(0).standard_normal(120).astype(np.float32)
    apply(server, {"a": delta}, server_round=1)

    params = list(twin.hnet.feature_extractor.parameters())
    params += list(twin.hnet.head(3).parameters()) + [twin.embedding("a")]
    optimizer = torch.optim.Adam(params, lr=twin.settings.lr)
    loss = (twin.hnet.generate(twin.embedding("a"), 120) * torch.from_numpy(delta)).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    optimizer.step()
    torch.testing.assert_close(server.embedding("a"), twin.embedding("a"))
    for got, want in zip(server.hnet.parameters(), twin.hnet.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_update_moves_theta_towards_the_trained_parameters():
    server = small_server(lr=1e-2)
    server.register("a", 120)
    before = server.generate(["a"])["a"]
    target = before + 0.5
    for r in range(20):
        current = server.generate(["a"])["a"]
        apply(server, {"a": current - target}, server_round=r)
    after = server.generate(["a"])["a"]
    assert np.abs(after - target).mean() < 0.5 * np.abs(before - target).mean()


@pytest.mark.parametrize("mode", ["parallel_sequential", "parallel_mean"])
def test_other_clients_and_heads_stay_bit_identical(mode):
    server = small_server(schedule=mode)
    server.register("a", 120)
    server.register("b", 101)  # same head as a
    server.register("c", 40)  # other head
    frozen_b = server.embedding("b").detach().clone()
    frozen_c = server.embedding("c").detach().clone()
    frozen_head1 = [p.detach().clone() for p in server.hnet.head(1).parameters()]
    head3 = [p.detach().clone() for p in server.hnet.head(3).parameters()]
    a_before = server.embedding("a").detach().clone()
    apply(server, {"a": np.ones(120, np.float32)}, server_round=1)
    assert torch.equal(server.embedding("b"), frozen_b)
    assert torch.equal(server.embedding("c"), frozen_c)
    assert all(
        torch.equal(p, q)
        for p, q in zip(server.hnet.head(1).parameters(), frozen_head1, strict=True)
    )
    assert not torch.equal(server.embedding("a"), a_before)
    assert not all(
        torch.equal(p, q) for p, q in zip(server.hnet.head(3).parameters(), head3, strict=True)
    )


def test_batched_mode_takes_one_step_on_the_mean_vjp():
    server = small_server(schedule="parallel_mean", grad_clip=1e9)
    twin = copy.deepcopy(server)
    for s in (server, twin):
        s.register("a", 120)
        s.register("c", 40)
    deltas = {"a": np.full(120, 0.1, np.float32), "c": np.full(40, -0.2, np.float32)}
    applied = apply(server, deltas, server_round=1)
    assert len(applied.norms) == 1
    pairs = [(twin.record(k), torch.from_numpy(v)) for k, v in deltas.items()]
    steps.clipped_step(twin, steps.gradients(twin, pairs, scale=0.5))
    for got, want in zip(server.hnet.parameters(), twin.hnet.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_sequential_mode_steps_once_per_client_in_a_seeded_order():
    server = small_server()
    for key in "abcde":
        server.register(key, 60)
    order = client_order(server.seed, list("abcde"), server_round=4)
    assert sorted(order) == list("abcde")
    assert order == client_order(server.seed, list("edcba"), server_round=4)
    assert any(client_order(server.seed, list("abcde"), r) != order for r in range(5, 10))
    applied = apply(server, {k: np.ones(60, np.float32) for k in "abc"}, server_round=1)
    assert len(applied.norms) == 3


def test_same_seed_gives_the_same_hypernetwork_whatever_the_registration_order():
    one, two = small_server(), small_server()
    one.register("x", 120)
    one.register("y", 40)
    two.register("y", 40)
    two.register("x", 120)
    assert np.array_equal(one.generate(["x"])["x"], two.generate(["x"])["x"])


def test_default_scale_of_generated_parameters_is_small():
    server = HypernetworkServer(seed=0)
    server.register("lenet", 234006)
    theta = server.generate(["lenet"])["lenet"]
    assert 0.01 < theta.std() < 0.1


@pytest.mark.parametrize("bad", [0, -5, 1.5, "12", None, True, 10**9])
def test_bad_parameter_counts_are_refused_without_changing_state(bad):
    server = small_server(max_params=10**6)
    server.register("ok", 120)
    groups = len(server.optimizer.param_groups)
    heads = sorted(server.hnet.heads)
    with pytest.raises(RegistrationError):
        server.register("new", bad)
    assert list(server.clients) == ["ok"]
    assert len(server.optimizer.param_groups) == groups
    assert sorted(server.hnet.heads) == heads


def test_a_key_cannot_change_its_parameter_count():
    server = small_server()
    first = server.register("a", 120)
    assert server.register("a", 120) is first  # idempotent
    with pytest.raises(RegistrationError, match="registered with K=120"):
        server.register("a", 121)
    assert server.record("a").num_params == 120
    assert len(server.embeddings) == 1


def test_integral_float_k_is_accepted():
    assert small_server().register("a", 120.0).num_params == 120


def test_cuda_request_falls_back_to_cpu_with_a_warning(caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with caplog.at_level("WARNING"):
        assert resolve_device("cuda").type == "cpu"
    assert "CUDA is not available" in caplog.text
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("mode", ["parallel_sequential", "parallel_mean"])
def test_the_order_replies_arrive_in_does_not_change_the_result(mode):
    servers = [small_server(schedule=mode) for _ in range(2)]
    rng = np.random.default_rng(7)
    deltas = {k: rng.normal(size=120).astype(np.float32) for k in "abcd"}
    for server in servers:
        for key in "abcd":
            server.register(key, 120)
    apply(servers[0], deltas, server_round=1)
    apply(servers[1], dict(reversed(list(deltas.items()))), server_round=1)
    for got, want in zip(servers[0].hnet.parameters(), servers[1].hnet.parameters(), strict=True):
        assert torch.equal(got, want)
