"""FedGH: private extractors, one shared header trained on the clients' class prototypes
(docs/design/baselines.md, section 2); each rule against a small independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message

from client_app.app import app as client_app
from client_app.methods.fedgh import PROTO_CLASSES, PROTO_VALUES, REP_DIM, prototypes
from common import protocol
from common.config import resolve_config
from common.models import build_model
from server_app.methods.fedgh import FedGHServer, FedGHSettings
from server_app.run import build_strategy
from simulation.grid import InProcessGrid
from tests.test_client_app import context_for, run_config, send
from tests.tiny_runs import mnist_accuracies


def test_prototypes_are_the_class_means_of_the_headers_input():
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=4, in_channels=1, image_size=28)
    x, y = torch.randn(30, 1, 28, 28), torch.tensor([3, 0, 3] * 10)
    classes, means = prototypes(model, x, y)
    model.eval()
    with torch.no_grad():  # independent: everything before the last Linear, by hand
        features = model.classifier[:5](model.features(x).flatten(1))
    assert classes.tolist() == [0, 3]  # only the classes held, ascending
    for c, mean in zip(classes, means, strict=True):
        np.testing.assert_allclose(mean, features[y == c].mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_the_header_trains_on_the_pairs_only_and_as_plain_sgd():
    settings = FedGHSettings(server_epochs=3, server_batch_size=2)
    server = FedGHServer(seed=0, max_params=10**6, settings=settings)
    server.register_header("a", 5 * 9, rep_dim=8)
    start = server.vector()
    server.update([], server_round=1)
    assert np.array_equal(server.vector(), start)  # no prototype, no change
    rng = np.random.default_rng(0)
    pairs = [(c, rng.normal(size=8).astype(np.float32)) for c in (0, 4, 2)]
    server.update(pairs, server_round=1)
    # a reimplementation: the same seeded order, plain SGD steps on cross-entropy
    header = torch.nn.Linear(8, 5)
    with torch.no_grad():
        header.weight.copy_(torch.from_numpy(start[:40].reshape(5, 8)))
        header.bias.copy_(torch.from_numpy(start[40:]))
    x = torch.from_numpy(np.stack([v for _, v in pairs]))
    y = torch.tensor([c for c, _ in pairs])
    from common.seeding import stable_seed

    generator = torch.Generator().manual_seed(stable_seed(0, "fedgh", 1))
    for _ in range(3):
        order = torch.randperm(3, generator=generator)
        for batch in order.split(2):
            header.zero_grad()
            F.cross_entropy(header(x[batch]), y[batch]).backward()
            with torch.no_grad():
                for p in header.parameters():
                    p -= 0.01 * p.grad
    want = torch.cat([header.weight.flatten(), header.bias]).detach().numpy()
    np.testing.assert_allclose(server.vector(), want, rtol=1e-6, atol=1e-7)


def test_clients_of_other_architectures_share_the_header_and_other_shapes_are_refused():
    server = FedGHServer(seed=0, max_params=10**6)
    server.register_header("lenet", 650, rep_dim=64)
    server.register_header("resnet18", 650, rep_dim=64)
    with pytest.raises(ValueError, match="one header"):
        server.register_header("wide", 1290, rep_dim=128)
    with pytest.raises(ValueError, match="no header of width"):
        server.register_header("odd", 651, rep_dim=64)
    assert sorted(server.clients) == ["lenet", "resnet18"]


def test_a_client_sends_prototypes_of_its_classes_and_keeps_its_extractor(tiny_npz, tmp_path):
    context = context_for({**run_config(tiny_npz, tmp_path), "method": "fedgh"},
                          {"partition-id": 0, "num-partitions": 2})  # fmt: skip
    identity = protocol.parse_identity(send(protocol.QUERY, context),
                                       (protocol.Count(REP_DIM),))  # fmt: skip
    d = identity.extras[REP_DIM]
    assert d == 64 and identity.num_params == 4 * (d + 1)  # the header of 4 classes
    header = np.random.default_rng(0).normal(0, 0.1, identity.num_params).astype(np.float32)
    reply = send(protocol.TRAIN, context, header)
    assert set(reply.content["arrays"]) == {PROTO_CLASSES, PROTO_VALUES}  # no delta, no model
    classes = reply.content["arrays"][PROTO_CLASSES].numpy()
    values = reply.content["arrays"][PROTO_VALUES].numpy()
    assert values.shape == (classes.size, d) and classes.size >= 1
    first = send(protocol.EVALUATE, context, header)
    again = send(protocol.EVALUATE, context, header)  # the extractor it kept, unchanged
    assert dict(first.content["metrics"]) == dict(again.content["metrics"])


@pytest.mark.parametrize(
    ("classes", "values", "reason"),
    [
        (np.array([2, 1], np.int32), np.zeros((2, 8), np.float32), "strictly increasing"),
        (np.array([7], np.int32), np.zeros((1, 8), np.float32), "class 7"),
        (np.array([1], np.int32), np.zeros((2, 8), np.float32), "shape"),
        (np.array([1], np.int32), np.full((1, 8), np.nan, np.float32), "NaN"),
        (np.array([1], np.int32), np.full((1, 8), 1e9, np.float32), "max_proto_abs"),
    ],
)
def test_hostile_prototypes_are_refused_with_a_reason(classes, values, reason):
    cfg = resolve_config("default", {"method": "fedgh", "server.min_nodes": 1})
    strategy = build_strategy(cfg)
    strategy.state.register_header("c0", 5 * 9, rep_dim=8)
    InProcessGrid(client_app, [{"partition-id": 0}], {})  # sets the identity a Message needs
    content = protocol.train_reply(None, 10, 0.5, extras={PROTO_CLASSES: classes,
                                                          PROTO_VALUES: values})  # fmt: skip
    message = Message(content, dst_node_id=1, message_type="train")
    with pytest.raises(protocol.ReplyError, match=reason):
        strategy.parse_train("c0", message)


def test_the_prototypes_count_as_traffic_up():
    """A reply without a delta still weighs what it carries: the round's bytes_up."""
    cfg = resolve_config("default", {"method": "fedgh", "server.min_nodes": 1})
    strategy = build_strategy(cfg)
    strategy.state.register_header("c0", 5 * 9, rep_dim=8)
    InProcessGrid(client_app, [{"partition-id": 0}], {})
    classes, values = np.array([1, 4], np.int32), np.ones((2, 8), np.float32)
    content = protocol.train_reply(None, 10, 0.5, extras={PROTO_CLASSES: classes,
                                                          PROTO_VALUES: values})  # fmt: skip
    result = strategy.parse_train("c0", Message(content, dst_node_id=1, message_type="train"))
    assert result.bytes_up == 2 * 4 + 2 * 8 * 4


def mnist_run(mnist_npz, shift: bool, rounds: int, monkeypatch) -> list[float]:
    if shift:  # the broken variant: the header learns every prototype as the next class
        original = FedGHServer.update
        monkeypatch.setattr(FedGHServer, "update", lambda self, pairs, r: original(
            self, [((c + 1) % self.num_classes, v) for c, v in pairs], r))  # fmt: skip
    return mnist_accuracies(mnist_npz, "fedgh", rounds)


@pytest.mark.slow
def test_fedgh_learns_on_mnist_and_a_mislabelled_header_does_not(mnist_npz, monkeypatch):
    """Measured here (lenet and mlp clients): 0.030, 0.547, 0.708, 0.733, 0.751; with the
    header trained on shifted classes: 0.458, 0.334, 0.319, 0.321 in rounds 1-4."""
    honest = mnist_run(mnist_npz, False, 4, monkeypatch)
    assert honest[0] < 0.2 and honest[-1] > 0.7, honest
    shifted = mnist_run(mnist_npz, True, 4, monkeypatch)
    assert max(shifted[2:]) < 0.45, shifted
