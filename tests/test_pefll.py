"""PeFLL: a client's data descriptor, the hypernetwork that maps it to a model, and the chain
rule split between server and client (docs/design/baselines.md, section 4)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from client_app.methods.pefll import DATA_SHAPE, DescriptorNet
from common import protocol
from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server_app.methods.pefll import PeFLLServer, PeFLLSettings
from tests.test_client_app import context_for, run_config, send
from tests.tiny_runs import mnist_accuracies

SIZES = (12, 3)


def server() -> PeFLLServer:
    state = PeFLLServer(0, 10**6, PeFLLSettings(descriptor_dim=3, hidden_dim=8, hidden_layers=1))
    state.register_client("a", 15, SIZES, (1, 4, 28))
    state.register_client("b", 15, SIZES, (1, 4, 28))
    state.note_descriptors({"a": np.array([0.5, -1.0, 2.0], np.float32),
                            "b": np.array([0.1, 0.2, 0.3], np.float32)})  # fmt: skip
    return state


def test_the_descriptor_depends_on_the_clients_data_and_nothing_else():
    torch.manual_seed(0)
    net = DescriptorNet(1, 4, 28, 3)
    x, y = torch.randn(10, 1, 28, 28), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    v = net.embed(x, y).mean(0)
    perm = torch.randperm(10)
    torch.testing.assert_close(net.embed(x[perm], y[perm]).mean(0), v)  # order: no matter
    assert not torch.allclose(net.embed(x, (y + 1) % 4).mean(0), v)  # the labels matter
    assert not torch.allclose(net.embed(x + 1, y).mean(0), v)  # the images matter


def test_scale_is_fixed_by_the_first_descriptor_and_survives_a_checkpoint(tmp_path):
    state = server()
    first = np.array([0.5, -1.0, 2.0])
    assert state.scale == pytest.approx((first.mean(), first.std()))
    state.note_descriptors({"a": np.array([9.0, 9.0, 9.0], np.float32)})
    assert state.scale == pytest.approx((first.mean(), first.std()))  # fixed once
    save_checkpoint(tmp_path / "c.pt", Checkpoint(state, 1, []))
    resumed = load_checkpoint(tmp_path / "c.pt", PeFLLServer).server
    assert resumed.scale == state.scale
    assert np.array_equal(resumed.generate(["b"])["b"], state.generate(["b"])["b"])


def test_the_servers_gradients_go_through_the_hypernetwork_and_the_standardisation():
    state = server()
    delta = np.random.default_rng(0).normal(size=15).astype(np.float32)
    g_h, g_v = state.gradients("a", delta)
    v = torch.tensor(state.descriptors["a"], requires_grad=True)  # independent: by hand
    m, s = state.scale
    inner = (state.hnet((v - m) / s) * torch.from_numpy(delta)).sum()
    want = torch.autograd.grad(inner, [v, *state.hnet.parameters()])
    np.testing.assert_allclose(g_v, want[0].numpy(), rtol=1e-5, atol=1e-7)
    for got, expected in zip(g_h, want[1:], strict=True):
        torch.testing.assert_close(got, expected)


def test_one_adam_step_on_the_clipped_mean_of_the_clients_gradients():
    state, twin = server(), None
    twin = copy.deepcopy(state)
    rng = np.random.default_rng(1)
    deltas = {k: rng.normal(size=15).astype(np.float32) for k in ("a", "b")}
    e_size = state.embed_vector().size
    e_grads = [rng.normal(size=e_size).astype(np.float32) for _ in range(2)]
    state.step([state.gradients(k, deltas[k])[0] for k in ("a", "b")], e_grads)
    # the twin: the mean of both clients' losses, backpropagated, the same clip and Adam
    params = [*twin.embed.parameters(), *twin.hnet.parameters()]
    optimizer = torch.optim.Adam(params, lr=twin.settings.lr)
    loss = sum((twin.hnet(twin.standardised(torch.from_numpy(twin.descriptors[k])))
                * torch.from_numpy(deltas[k])).sum() for k in ("a", "b")) / 2  # fmt: skip
    loss.backward()
    mean_e = torch.from_numpy(np.mean(e_grads, axis=0))
    offset = 0
    for p in twin.embed.parameters():
        p.grad = mean_e[offset : offset + p.numel()].reshape(p.shape).clone()
        offset += p.numel()
    torch.nn.utils.clip_grad_norm_(params, twin.settings.grad_clip)
    optimizer.step()
    for got, want in zip([*state.embed.parameters(), *state.hnet.parameters()], params,
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_clients_embedding_gradient_is_the_chain_rule_on_its_own_samples(tiny_npz, tmp_path):
    rc = {**run_config(tiny_npz, tmp_path), "method": "pefll", "clients.models": "mlp"}
    context = context_for(rc, {"partition-id": 0, "num-partitions": 2})
    config = protocol.read_config(send(protocol.QUERY, context))
    shape = tuple(int(config[n]) for n in DATA_SHAPE)
    torch.manual_seed(0)
    net = DescriptorNet(*shape, 3)
    vector = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    g_v = np.array([1.0, -2.0, 0.5], np.float32)
    from client_app.methods.pefll import DESCRIPTOR_GRAD, EMBED_GRAD, EMBED_NET

    def ask(kind, extras):
        from flwr.app import Message

        content = protocol.instruction(None, 1, {"scope": "batches", "embed-batches": 1,
                                                 "descriptor-dim": 3}, extras=extras)  # fmt: skip
        message = Message(content, dst_node_id=context.node_id, message_type=kind)
        message.metadata.__dict__["_message_id"] = "m1"
        from client_app.app import app

        return app(message, context)

    v = ask("train.descriptor", {EMBED_NET: vector}).content["arrays"]["descriptor"].numpy()
    grad = ask("train.embedgrad", {EMBED_NET: vector, DESCRIPTOR_GRAD: g_v})
    got = grad.content["arrays"][EMBED_GRAD].numpy()
    # independent: the same seeded batch, autograd of <v(E), g_v>
    from client_app.session import open_session

    session = open_session(context)
    order = torch.randperm(len(session.data.y_train), generator=session.generator("descriptor", 1))
    picked = order[: session.cfg.client.batch_size]
    x, y = session.data.x_train[picked], session.data.y_train[picked]
    descriptor = net.embed(x, y).mean(0)
    np.testing.assert_allclose(v, descriptor.detach().numpy(), rtol=1e-5, atol=1e-6)
    (descriptor * torch.from_numpy(g_v)).sum().backward()
    want = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def mnist_run(mnist_npz, flip: bool, rounds: int, monkeypatch) -> list[float]:
    if flip:  # the broken variant: the hypernetwork and E climb instead of descending
        original = PeFLLServer.gradients
        monkeypatch.setattr(PeFLLServer, "gradients",
                            lambda self, key, delta: original(self, key, -delta))  # fmt: skip
    return mnist_accuracies(mnist_npz, "pefll", rounds, **{"clients.models": "lenet",
                            "client.lr": 0.05, "client.epochs": 2, "client.weight_decay": 1e-4,
                            "pefll.lr": 1e-3})  # fmt: skip


@pytest.mark.slow
def test_pefll_learns_on_mnist_and_a_flipped_update_does_not(mnist_npz, monkeypatch):
    """Measured here (one Adam step a round, lr 1e-3) on one thread: 0.20 at round 0, 0.45 at
    4, 0.65 at 9, 0.61 at 12; flipped: 0.03 at round 1, then 0. The curve depends on the
    thread count (on two threads it reaches 0.91 by round 12: float sums in another order), so
    the test pins one thread and asks for the mean of the last four rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        honest = mnist_run(mnist_npz, False, 12, monkeypatch)
        flipped = mnist_run(mnist_npz, True, 3, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert honest[0] < 0.25 and sum(honest[-4:]) / 4 > 0.55, honest
    assert max(flipped[1:]) < 0.1, flipped


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.full(3, np.nan, np.float32), "NaN"),
        (np.zeros(4, np.float32), "shape"),
        (np.zeros(3, np.float64), "dtype"),
    ],
)
def test_hostile_descriptors_are_refused_with_a_reason(values, reason):
    from client_app.app import app as client_app
    from client_app.methods.pefll import DESCRIPTOR
    from simulation.grid import InProcessGrid

    InProcessGrid(client_app, [{"partition-id": 0}], {})  # the identity a Message needs
    from flwr.app import Message

    field = protocol.Floats(DESCRIPTOR, max_size=4096, shape=(3,))
    message = Message(protocol.fields_reply({DESCRIPTOR: values}), dst_node_id=1,
                      message_type="train.descriptor")  # fmt: skip
    with pytest.raises(protocol.ReplyError, match=reason):
        protocol.parse_fields_reply(message, [field])
    extra = Message(protocol.fields_reply({DESCRIPTOR: np.zeros(3, np.float32), "x": values}),
                    dst_node_id=1, message_type="train.descriptor")  # fmt: skip
    with pytest.raises(protocol.ReplyError, match="carries 'x'"):
        protocol.parse_fields_reply(extra, [field])
