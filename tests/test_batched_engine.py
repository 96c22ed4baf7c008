"""The batched engine gives the per-client loop's numbers (issue: fast simulation).

Same seed, a small mixed-architecture case (LeNet, ResNet10 with BatchNorm, MLP), non-IID_2
so that clients hold different numbers of images (partial last batches, clients with fewer
batches): after 2 rounds the generated vectors, the round-2 deltas and the metrics agree to
float32 tolerance. Batched convolutions and BatchNorm sum in another order than the loop, and
BatchNorm's mean subtraction amplifies that, hence a tolerance instead of bit equality; a run
with another seed is far outside it, so the comparison can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp
from torch.nn.utils import parameters_to_vector

from client_app.app import app as client_app
from client_app.batched import train_each, train_together
from client_app.training import SGDSettings, train_sgd
from common.config import resolve_config
from common.models import build_model
from server_app.run import build_strategy
from simulation.batched_grid import BatchedGrid
from simulation.grid import InProcessGrid, torch_threads
from simulation.run import run_inprocess

NUM_CLIENTS = 6


def run(
    tiny_npz, tmp_path, engine, method="mh_pfedhn", seed=0, vectorize: bool | None = True, workers=1
):
    run_cfg = {
        "experiment": "default",
        "method": method,
        "seed": seed,
        "engine": engine,
        "data.source": f"npz:{tiny_npz}",
        "data.num_clients": NUM_CLIENTS,
        "data.partitioner": "noniid2",
        "data.dirichlet_beta": 0.5,
        "data.min_samples": 5,
        "data.classes_per_client": 2,
        "data.normalize": "none",
        "data.cache_dir": str(tmp_path / "cache"),
        "clients.models": "lenet,resnet10,mlp",
        "client.epochs": 1,
        "client.batch_size": 16,
        "hypernetwork.hidden_dim": 8,
        "rounds": 2,
        "server.min_nodes": NUM_CLIENTS,
        "server.wait_for_nodes_s": 0,
        "server.checkpoint_every": 0,
        # a parallel round, whose clients the batched engine trains together
        "hypernetwork.schedule": "parallel_sequential",
    }
    cfg = resolve_config("default", run_cfg)
    if engine == "batched":  # vectorize True: the vmap path, which the CPU would otherwise not take
        grid = BatchedGrid.simulation(
            client_app, NUM_CLIENTS, run_cfg, vectorize=vectorize, workers=workers
        )
    else:
        grid = InProcessGrid.simulation(client_app, NUM_CLIENTS, run_cfg)
    strategy = build_strategy(cfg)
    deltas: dict[int, dict] = {}
    apply = strategy.apply_train

    def recording(server_round, results):
        deltas[server_round] = {k: np.array(r.delta) for k, r in results.items()}
        return apply(server_round, results)

    strategy.apply_train = recording
    strategy.start(grid)
    vectors = strategy.state.generate(sorted(strategy.state.clients))
    return strategy, vectors, deltas


def max_relative_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)


@pytest.mark.parametrize("method", ["mh_pfedhn", "mh_pfedhngd"])
def test_batched_and_loop_engines_agree_after_two_rounds(method, tiny_npz, tmp_path):
    loop, loop_vectors, loop_deltas = run(tiny_npz, tmp_path, "loop", method)
    batched, batched_vectors, batched_deltas = run(tiny_npz, tmp_path, "batched", method)
    vector_gap = max_relative_gap(loop_vectors, batched_vectors)
    delta_gap = max_relative_gap(loop_deltas[2], batched_deltas[2])
    assert vector_gap < 2e-3 and delta_gap < 2e-2, (vector_gap, delta_gap)
    for a, b in zip(loop.history, batched.history, strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        if a["round"]:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["clients_trained"] == b["clients_trained"] == NUM_CLIENTS
    # the tolerance means something: another seed lands far outside it
    _, _, other_deltas = run(tiny_npz, tmp_path, "batched", method, seed=1)
    assert max_relative_gap(loop_deltas[2], other_deltas[2]) > 0.2


def test_on_the_cpu_the_batched_engine_is_the_loop_bit_for_bit(tiny_npz, tmp_path):
    """Without vmap (the CPU default) clients train one by one, 3 at a time in threads:
    identical numbers."""
    loop, loop_vectors, loop_deltas = run(tiny_npz, tmp_path, "loop")
    batched, vectors, deltas = run(tiny_npz, tmp_path, "batched", vectorize=None, workers=3)
    assert all(np.array_equal(loop_vectors[k], vectors[k]) for k in vectors)
    assert all(np.array_equal(loop_deltas[2][k], deltas[2][k]) for k in deltas[2])
    assert [r["accuracy"] for r in loop.history] == [r["accuracy"] for r in batched.history]


def train_both(architecture: str, sizes: list[int], settings: SGDSettings):
    """The same clients (own data, own start) trained by train_sgd one by one and by
    train_together; returns (loop models, loop losses, batched models, batched losses)."""
    data = [
        (torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(n)),
         torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n + 1)))
        for n in sizes
    ]  # fmt: skip

    def fresh(i: int):
        torch.manual_seed(100 + i)  # every client starts from other parameters
        return build_model(architecture, num_classes=4, in_channels=1)

    loop = [fresh(i) for i in range(len(sizes))]
    loop_losses = [
        train_sgd(m, x, y, settings, torch.Generator().manual_seed(i))
        for i, (m, (x, y)) in enumerate(zip(loop, data, strict=True))
    ]
    together = [fresh(i) for i in range(len(sizes))]
    generators = [torch.Generator().manual_seed(i) for i in range(len(sizes))]
    losses = train_together(together, data, settings, generators, vectorize=True)
    return loop, loop_losses, together, losses


def largest_gap(a_models, b_models) -> float:
    return max(
        float((pa - pb).abs().max() / (pa.abs().max() + 1e-12))
        for a, b in zip(a_models, b_models, strict=True)
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        if pa.is_floating_point()
    )


def test_train_together_follows_train_sgd_through_ragged_batches_momentum_and_clipping():
    """LeNet, 4 clients of 7, 16, 33 and 50 images, batch 16, 2 epochs, a large lr and a
    small clip so that clipping acts: partial batches of different sizes step in groups of
    their own, clients with fewer batches stop early; the result is the loop's to 1e-5."""
    settings = SGDSettings(lr=0.05, epochs=2, batch_size=16, grad_clip=0.5)
    loop, loop_losses, together, losses = train_both("lenet", [7, 16, 33, 50], settings)
    assert losses == pytest.approx(loop_losses, rel=1e-5)
    assert largest_gap(loop, together) < 1e-5


def test_train_together_keeps_batchnorm_statistics_per_client():
    """ResNet10, one batch each of 5, 9 and 16 images: each client's running statistics and
    batch count are its own, as in the loop. (Over many steps a BatchNorm ResNet amplifies
    float-order differences: the loop itself with 1 or 2 threads then differs by percents,
    which is why the two-round test above uses a tolerance.)"""
    settings = SGDSettings(lr=0.01, epochs=1, batch_size=16)
    loop, loop_losses, together, losses = train_both("resnet10", [5, 9, 16], settings)
    assert losses == pytest.approx(loop_losses, rel=1e-5)
    # absolute: after one step BatchNorm biases are ~1e-4, where float order alone (AVX2 vs
    # AVX-512 kernels) moves them by 0.5% of themselves; parameters are ~0.1
    gap = max(
        float((pa - pb).abs().max())
        for a, b in zip(loop, together, strict=True)
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        if pa.is_floating_point()
    )
    assert gap < 5e-5
    for a, b in zip(loop, together, strict=True):
        assert int(a.stem[1].num_batches_tracked) == int(b.stem[1].num_batches_tracked) == 1
    means = [m.stem[1].running_mean.clone() for m in together]
    assert not torch.equal(means[0], means[1])


def clients(architectures: list[str], sizes: list[int], dropout: bool = False):
    """Models (own start each) and data (own images each) for train_each."""
    models, data = [], []
    for i, (architecture, n) in enumerate(zip(architectures, sizes, strict=True)):
        torch.manual_seed(100 + i)
        model = build_model(architecture, num_classes=4, in_channels=1)
        models.append(torch.nn.Sequential(model, torch.nn.Dropout(0.5)) if dropout else model)
        g = torch.Generator().manual_seed(n)
        data.append(
            (torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))
        )
    return models, data


@pytest.mark.parametrize("threads", [1, 2])
def test_clients_trained_in_parallel_threads_are_the_loop_bit_for_bit(threads):
    """Mixed architectures (BatchNorm ResNet10 included) and sizes, 3 workers: each client's
    parameters, buffers and loss equal train_sgd's exactly, at either torch thread count."""
    settings = SGDSettings(lr=0.05, epochs=2, batch_size=16, grad_clip=0.5)
    architectures, sizes = ["lenet", "resnet10", "mlp", "lenet", "resnet10"], [40, 23, 61, 9, 30]
    with torch_threads(threads):
        loop_models, data = clients(architectures, sizes)
        loop_losses = [
            train_sgd(m, x, y, settings, torch.Generator().manual_seed(i))
            for i, (m, (x, y)) in enumerate(zip(loop_models, data, strict=True))
        ]
        models, _ = clients(architectures, sizes)
        generators = [torch.Generator().manual_seed(i) for i in range(len(models))]
        losses = train_each(models, data, settings, generators, workers=3)
    assert losses == loop_losses
    for a, b in zip(loop_models, models, strict=True):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), name


def test_models_with_dropout_train_one_at_a_time_in_the_loops_order():
    """Dropout draws from the global generator: in threads the draws would interleave, so
    such clients train sequentially and reproduce the loop under the same global seed."""
    settings = SGDSettings(lr=0.05, epochs=1, batch_size=8)
    loop_models, data = clients(["mlp", "mlp", "mlp"], [24, 40, 16], dropout=True)
    torch.manual_seed(7)
    loop_losses = [
        train_sgd(m, x, y, settings, torch.Generator().manual_seed(i))
        for i, (m, (x, y)) in enumerate(zip(loop_models, data, strict=True))
    ]
    models, _ = clients(["mlp", "mlp", "mlp"], [24, 40, 16], dropout=True)
    torch.manual_seed(7)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    assert train_each(models, data, settings, generators, workers=3) == loop_losses
    for a, b in zip(loop_models, models, strict=True):
        assert torch.equal(
            parameters_to_vector(a.parameters()), parameters_to_vector(b.parameters())
        )


@pytest.mark.parametrize("kind", ["dropout", "frozen"])
def test_models_vmap_cannot_train_as_the_loop_does_train_client_by_client(kind):
    """vmap has no client generator for dropout (it raised) and steps every stacked parameter
    (a frozen one moved): such models fall back to the loop's training, bit for bit."""
    settings = SGDSettings(lr=0.05, epochs=1, batch_size=8)

    def built():
        models, data = clients(["mlp", "mlp"], [24, 16], dropout=kind == "dropout")
        if kind == "frozen":
            for m in models:
                next(m.parameters()).requires_grad_(False)
        return models, data

    loop_models, data = built()
    frozen = [next(m.parameters()).clone() for m in loop_models]
    loop_losses = [
        train_sgd(m, x, y, settings, torch.Generator().manual_seed(i))
        for i, (m, (x, y)) in enumerate(zip(loop_models, data, strict=True))
    ]
    models, _ = built()
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    assert train_together(models, data, settings, generators, vectorize=True) == loop_losses
    for a, b, start in zip(loop_models, models, frozen, strict=True):
        assert torch.equal(
            parameters_to_vector(a.parameters()), parameters_to_vector(b.parameters())
        )
        if kind == "frozen":
            assert torch.equal(next(b.parameters()), start)


def test_a_given_client_app_is_refused_by_the_batched_engine():
    """The batched engine trains through the client methods, not the ClientApp: a scripted
    or attacking ClientApp would be silently bypassed (an attack that never happens)."""
    cfg = resolve_config("default", {"engine": "batched"})
    with pytest.raises(ValueError, match="use engine: loop"):
        run_inprocess(cfg, {"engine": "batched"}, client_app=ClientApp())


def test_joined_data_is_rebuilt_when_a_clients_tensor_is_another_at_the_same_address(
    monkeypatch,
):
    """The join is keyed on storage addresses; freed data's addresses can be reused by the
    next seed's, which must not get the previous seed's joined images."""
    from client_app import batched

    monkeypatch.setattr(batched, "_JOINED", {})
    x1, y1 = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    first, _ = batched._joined([(x1, y1)], torch.device("cpu"))
    assert batched._joined([(x1, y1)], torch.device("cpu"))[0] is first  # built once
    ((key, (xs, ys, refs)),) = batched._JOINED.items()
    x2 = torch.ones(4, 3)  # as if x1 were freed and x2 allocated at its address
    batched._JOINED[key] = (xs, ys, [lambda: x2, refs[1]])
    again, _ = batched._joined([(x1, y1)], torch.device("cpu"))
    assert again is not first and torch.equal(again, x1)
