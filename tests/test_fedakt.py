"""FedAKT as reconstructed here (docs/design/baselines.md, section 5): a shared adapter beside
each private model, averaged by the server; each rule against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client_app.methods.fedakt import Adapter, AdapterObjective, WithAdapter
from common import protocol
from common.models import build_model
from tests.test_client_app import context_for, run_config, send
from tests.tiny_runs import mnist_accuracies


def composite(architecture: str = "lenet") -> WithAdapter:
    torch.manual_seed(0)
    private = build_model(architecture, num_classes=4, in_channels=1, image_size=28)
    return WithAdapter(private, Adapter(1))


def test_the_loss_is_both_cross_entropies_plus_mu_times_the_feature_mse():
    model = composite()
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 0, 1])
    logits = model(x)
    got = AdapterObjective(0.5, hdu=True)(model, x, logits, y)
    with torch.no_grad():  # independent: the features by hand
        private = model.private
        local = private.classifier[:5](private.features(x).flatten(1))
        adapted = model.adapter(x)
        header = private.classifier[5]
        want = (F.cross_entropy(header(local), y) + F.cross_entropy(header(adapted), y)
                + 0.5 * F.mse_loss(local, adapted))  # fmt: skip
    torch.testing.assert_close(got.detach(), want)


def test_without_fmd_and_hdu_the_adapter_gets_no_gradient():
    model = composite()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    AdapterObjective(0.0, hdu=False)(model, x, model(x), y).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.adapter.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.private.parameters())


def test_the_adapter_is_all_that_travels_and_the_same_size_for_every_architecture(
    tiny_npz, tmp_path
):
    sizes = {}
    for i, architecture in enumerate(("lenet", "mlp")):
        rc = {**run_config(tiny_npz, tmp_path), "method": "fedakt",
              "clients.models": "lenet,mlp"}  # fmt: skip
        context = context_for(rc, {"partition-id": i, "num-partitions": 2})
        query = send(protocol.QUERY, context)
        k = protocol.read_config(query)[protocol.NUM_PARAMS]
        initial = query.content["arrays"][protocol.INITIAL].numpy()
        sizes[architecture] = (k, initial.tobytes())
        reply = send(protocol.TRAIN, context, initial)
        assert set(reply.content["arrays"]) == {protocol.DELTA}
        assert reply.content["arrays"][protocol.DELTA].numpy().shape == (k,)
    assert sizes["lenet"] == sizes["mlp"]  # one adapter, seeded alike on every client


def test_without_fmd_and_hdu_the_adapters_delta_is_exactly_zero(tiny_npz, tmp_path):
    rc = {**run_config(tiny_npz, tmp_path), "method": "fedakt", "fedakt.fmd_weight": 0.0,
          "fedakt.hdu": False}  # fmt: skip
    context = context_for(rc, {"partition-id": 0, "num-partitions": 2})
    initial = send(protocol.QUERY, context).content["arrays"][protocol.INITIAL].numpy()
    delta = send(protocol.TRAIN, context, initial).content["arrays"][protocol.DELTA].numpy()
    assert not delta.any()
    first = send(protocol.EVALUATE, context, initial)
    again = send(protocol.EVALUATE, context, initial)  # its own model, kept unchanged
    assert dict(first.content["metrics"]) == dict(again.content["metrics"])


def mnist_run(mnist_npz, broken: bool, monkeypatch) -> list[float]:
    if broken:  # a client that does not keep its own model between rounds
        from client_app.session import Session

        monkeypatch.setattr(Session, "save_local_model", lambda self, model: None)
    return mnist_accuracies(mnist_npz, "fedakt", 4)


@pytest.mark.slow
def test_fedakt_learns_on_mnist_and_a_client_that_forgets_its_model_does_not(
    mnist_npz, monkeypatch
):
    """Measured here: 0.039, 0.499, 0.611, 0.658, 0.672; forgetting: 0.039 throughout."""
    honest = mnist_run(mnist_npz, False, monkeypatch)
    assert honest[0] < 0.2 and honest[-1] > 0.6, honest
    assert max(mnist_run(mnist_npz, True, monkeypatch)) < 0.2
    assert np.isfinite(honest).all()
