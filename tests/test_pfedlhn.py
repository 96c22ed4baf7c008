"""pFedLHN: layer-wise client embeddings C_i over a shared bank E, theta_i^l =
Head_l(fc1(C_i[l] E)); each rule against a small independent computation, then learning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.config import resolve_config
from common.models import build_model
from server_app import hypernetwork_steps as steps
from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server_app.hypernetwork_server import HypernetworkSettings
from server_app.methods.pfedlhn import PFedLHNServer
from server_app.run import build_state
from server_app.schedules import OneByOne
from tests.tiny_runs import mnist_accuracies

SMALL = HypernetworkSettings(embedding_dim=3, hidden_dim=8, embedding_std=0.002)


def server_with(*clients: tuple[str, str]) -> PFedLHNServer:
    server = PFedLHNServer(SMALL, bank_dim=6, seed=1)
    for key, architecture in clients:
        model = build_model(architecture, num_classes=10, in_channels=1, image_size=28)
        sizes = [p.numel() for p in model.parameters()]
        server.set_tensor_sizes(key, sizes)
        server.register(key, sum(sizes))
    return server


def test_each_tensor_is_its_heads_map_of_fc1_of_its_row_of_c_times_e():
    server = server_with(("a", "mlp"), ("b", "lenet"))
    bank, fc1 = server.hnet.feature_extractor
    E = bank.weight.detach().T  # (n_e, e)
    for key in ("a", "b"):
        C = server.embedding(key).detach()  # (L, n_e): a row per tensor
        heads = server.heads_of(key).heads
        assert C.shape == (len(heads), 3)
        expected = [
            heads[t](fc1(C[t] @ E)).detach() for t in range(len(heads))
        ]  # independent: row by row
        got = server.generate([key])[key]
        np.testing.assert_allclose(got, torch.cat(expected).numpy(), rtol=1e-5, atol=1e-7)
        sizes = server.sizes_of[key]
        assert got.size == sum(sizes) and [h.out_features for h in heads] == list(sizes)


def test_initial_coefficients_are_small_seeded_by_key_and_the_bank_is_shared():
    server = server_with(("a", "lenet"), ("b", "lenet"), ("c", "mlp"))
    c_a, c_b = server.embedding("a").detach(), server.embedding("b").detach()
    assert 0.001 < float(torch.cat([c_a, c_b]).std()) < 0.003 and not torch.equal(c_a, c_b)
    again = server_with(("b", "lenet"))
    assert torch.equal(again.embedding("b"), c_b)  # its key's draw, whoever came first
    assert len(server.architectures) == 2 and server.heads_of("a") is server.heads_of("b")
    assert server.heads_of("a") is not server.heads_of("c")


def test_a_step_moves_the_bank_fc1_its_heads_and_its_coefficients_only():
    server = server_with(("a", "lenet"), ("b", "lenet"), ("c", "mlp"))
    before = copy.deepcopy(server)
    delta = np.random.default_rng(0).normal(size=server.record("a").num_params)
    steps.step_client(server, "a", delta.astype(np.float32))
    assert not torch.equal(server.embedding("a"), before.embedding("a"))
    for key in ("b", "c"):
        assert torch.equal(server.embedding(key), before.embedding(key))
    moved = lambda m, n: any(  # noqa: E731
        not torch.equal(p, q) for p, q in zip(m.parameters(), n.parameters(), strict=True)
    )
    assert moved(server.hnet.feature_extractor, before.hnet.feature_extractor)
    assert moved(server.heads_of("a"), before.heads_of("a"))
    assert not moved(server.heads_of("c"), before.heads_of("c"))


def test_the_state_resumes_bit_for_bit(tmp_path):
    whole, split = server_with(("a", "lenet"), ("c", "mlp")), None
    split = copy.deepcopy(whole)
    rng = np.random.default_rng(3)
    deltas = [{k: rng.normal(size=whole.record(k).num_params).astype(np.float32)
               for k in ("a", "c")} for _ in range(2)]  # fmt: skip
    OneByOne().apply(whole, deltas[0], 1)
    OneByOne().apply(whole, deltas[1], 2)
    OneByOne().apply(split, deltas[0], 1)
    save_checkpoint(tmp_path / "c.pt", Checkpoint(split, 1, []))
    resumed = load_checkpoint(tmp_path / "c.pt", PFedLHNServer).server
    OneByOne().apply(resumed, deltas[1], 2)
    assert resumed.bank_dim == 6
    for key in ("a", "c"):
        assert np.array_equal(resumed.generate([key])[key], whole.generate([key])[key])


def test_its_settings_shape_the_generator():
    cfg = resolve_config("default", {"method": "pfedlhn", "pfedlhn.bank_size": 7,
                                     "pfedlhn.hidden_dim": 16})  # fmt: skip
    state = build_state(cfg)
    bank, fc1 = state.hnet.feature_extractor
    assert bank.weight.shape == (40, 7) and fc1.weight.shape == (16, 40)
    assert state.settings.embedding_std == 0.002


def mnist_run(mnist_npz, flip: bool, rounds: int, monkeypatch) -> list[float]:
    if flip:  # the broken variant: every step climbs instead of descending
        original = OneByOne.apply
        monkeypatch.setattr(OneByOne, "apply", lambda self, server, deltas, r: original(
            self, server, {k: -v for k, v in deltas.items()}, r))  # fmt: skip
    return mnist_accuracies(mnist_npz, "pfedlhn", rounds)


@pytest.mark.slow
def test_pfedlhn_learns_on_mnist_and_a_flipped_update_does_not(mnist_npz, monkeypatch):
    """Measured here: 0.125, 0.395, 0.628, 0.662, 0.755 (rounds 0-4); flipped: 0.0 from
    round 1 on."""
    honest = mnist_run(mnist_npz, False, 4, monkeypatch)
    assert honest[0] < 0.3 and honest[-1] > 0.6, honest
    flipped = mnist_run(mnist_npz, True, 1, monkeypatch)
    assert max(flipped[1:]) < 0.3, flipped
