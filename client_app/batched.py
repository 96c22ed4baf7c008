"""The batched engine: local training of many clients of one architecture at once.

`train_sgd` trains one client: per epoch a seeded permutation, batches of B, cross-entropy,
per-step gradient clipping, SGD with momentum and weight decay. Here the same steps run for
all clients of a group together: their parameters, BatchNorm buffers and momentum buffers are
stacked along a new first dimension and one `torch.func.vmap` of `grad` computes every
client's step from its own batch. Each client keeps its own data order (its generator draws
the same permutations as in `train_sgd`), dataset size and optimizer state. Clients whose
current batch is smaller (the last, partial batch of an epoch) step in a group of their own
size, and clients with fewer batches simply stop stepping: nothing is padded, so BatchNorm's
batch statistics see exactly the samples they would in the loop. This pays on a GPU; on the
CPU the clients train one by one with `train_sgd`, several at a time in threads (see
`train_each`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from client_app.training import SGDSettings, train_sgd

DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _stacked(tensors_per_client: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        name: torch.stack([t[name].detach() for t in tensors_per_client])
        for name in tensors_per_client[0]
    }


def uses_vmap(device: torch.device, vectorize: bool | None) -> bool:
    """vectorize None: vmap on CUDA, where one kernel for all clients replaces many small
    ones; on the CPU the vmapped step measured 0.5-0.85x the speed of client-by-client
    training (grouped convolutions and max-pooling under vmap are slow there)."""
    return device.type == "cuda" if vectorize is None else vectorize


def train_together(
    models: Sequence[nn.Module],
    datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    settings: SGDSettings,
    generators: Sequence[torch.Generator],
    vectorize: bool | None = None,
    workers: int = 1,
) -> list[float]:
    """Train every model on its own (x, y) as `train_sgd` would; the models' parameters and
    buffers are updated in place. Returns each mean batch loss.

    With vmap (`uses_vmap`) the models must share one architecture; without it they train
    client by client, `workers` at a time (`train_each`).
    """
    if not models:
        return []
    template = models[0]
    device = next(template.parameters()).device
    if not uses_vmap(device, vectorize) or not all(map(_vmappable, models)):
        return train_each(models, datasets, settings, generators, workers)
    count = len(models)
    params = _stacked([dict(m.named_parameters()) for m in models])
    buffers = _stacked([dict(m.named_buffers()) for m in models])
    momentum = {name: torch.zeros_like(p) for name, p in params.items()}

    # Every client's batches, in train_sgd's order: epoch by epoch, one permutation each.
    sizes = [len(y) for _, y in datasets]
    x_all, y_all = _joined(datasets, device)
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
    schedules: list[list[torch.Tensor]] = []
    for size, offset, generator in zip(sizes, offsets, generators, strict=True):
        batches = []
        for _ in range(settings.epochs):
            order = torch.randperm(size, generator=generator) + offset
            batches += list(order.split(settings.batch_size))
        schedules.append(batches)

    template.train()

    def loss_of(p, b, x, y):
        return F.cross_entropy(functional_call(template, (p, b), (x,)), y)

    step_all = vmap(grad_and_value(loss_of))
    totals = torch.zeros(count, dtype=torch.float64, device=device)  # no sync per step
    steps = max(len(s) for s in schedules)
    for step in range(steps):
        groups: dict[int, list[int]] = {}
        for client, schedule in enumerate(schedules):
            if step < len(schedule):
                groups.setdefault(len(schedule[step]), []).append(client)
        for members in groups.values():
            index = torch.stack([schedules[c][step] for c in members]).to(device)
            whole = len(members) == count
            pick = torch.tensor(members, device=device)
            p, b, m = (_rows(t, None if whole else pick) for t in (params, buffers, momentum))
            grads, losses = step_all(p, b, x_all[index], y_all[index])
            _clip_per_client(grads, settings.grad_clip)
            first = step == 0  # torch.optim.SGD starts its momentum buffer at d_p
            with torch.no_grad():
                for name, value in p.items():
                    d_p = grads[name] + settings.weight_decay * value
                    buf = d_p if first else m[name] * settings.momentum + d_p
                    m[name] = buf
                    p[name] = value - settings.lr * buf
            if whole:
                params, momentum, buffers = p, m, b
            else:
                for target, source in ((params, p), (momentum, m), (buffers, b)):
                    for name, value in source.items():
                        target[name].index_copy_(0, pick, value)
            totals[pick] += losses.detach()
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, value in model.named_parameters():
                value.copy_(params[name][i])
            for name, value in model.named_buffers():
                value.copy_(buffers[name][i])
    return [float(t) / max(len(s), 1) for t, s in zip(totals.tolist(), schedules, strict=True)]


def train_each(
    models: Sequence[nn.Module],
    datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    settings: SGDSettings,
    generators: Sequence[torch.Generator],
    workers: int = 1,
) -> list[float]:
    """`train_sgd` for each client, `workers` clients at a time in threads (PyTorch releases
    the GIL in its kernels), each with the caller's torch thread count: every client's
    arithmetic is the loop's, bit for bit, only the clients' order in time changes. As Ray
    runs cores / cpus-per-client ClientApps at once, this keeps all cores busy with small
    models that one client cannot. The costliest clients (samples x parameters) start first.
    Models with dropout train one at a time: their draws from the global generator would
    otherwise interleave."""
    threads = torch.get_num_threads()

    def one(i: int) -> float:
        torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread
        x, y = datasets[i]
        return train_sgd(models[i], x, y, settings, generators[i])

    count = len(models)
    if workers <= 1 or count == 1 or any(_draws_randomness(m) for m in models):
        return [one(i) for i in range(count)]

    def cost(i: int) -> int:
        return len(datasets[i][1]) * sum(p.numel() for p in models[i].parameters())

    cuda = sorted({p.device.index or 0 for m in models for p in m.parameters() if p.is_cuda})
    # each client's train_sgd forks and restores the global generator; threads interleave
    # those restores, so the state the pool leaves behind is set back here, once
    with (
        torch.random.fork_rng(devices=cuda),
        ThreadPoolExecutor(min(workers, count), thread_name_prefix="client") as pool,
    ):
        futures = {i: pool.submit(one, i) for i in sorted(range(count), key=cost, reverse=True)}
    return [futures[i].result() for i in range(count)]


def _draws_randomness(model: nn.Module) -> bool:
    """Dropout modules (a model drawing random numbers some other way in `forward` should use
    `engine: loop`, docs/simulations.md)."""
    return any(isinstance(m, DROPOUT) for m in model.modules())


def _vmappable(model: nn.Module) -> bool:
    """vmap steps every stacked parameter with no generator of the client's: a model with
    dropout or with frozen (requires_grad=False) parameters trains client by client."""
    return not _draws_randomness(model) and all(p.requires_grad for p in model.parameters())


def _rows(tensors: dict[str, torch.Tensor], pick: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The picked clients' slices (copies), or all of them as they are."""
    return tensors if pick is None else {n: t.index_select(0, pick) for n, t in tensors.items()}


_JOINED: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[weakref.ref]]] = {}


def _joined(
    datasets: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """All clients' data in one tensor on the device, built once per group and run (the
    clients' tensors are memoised per process, so their storage identifies them; weak
    references check that it still does: freed data's addresses can be reused)."""
    key = (str(device), *((x.data_ptr(), len(x), y.data_ptr()) for x, y in datasets))
    sources = [t for pair in datasets for t in pair]
    cached = _JOINED.get(key)
    if cached is None or any(ref() is not t for ref, t in zip(cached[2], sources, strict=True)):
        _JOINED.pop(key, None)
        if len(_JOINED) >= 8:
            _JOINED.pop(next(iter(_JOINED)))
        x_all = torch.cat([x for x, _ in datasets]).to(device)
        y_all = torch.cat([y for _, y in datasets]).to(device)
        _JOINED[key] = cached = (x_all, y_all, [weakref.ref(t) for t in sources])
    return cached[0], cached[1]


def _clip_per_client(grads: dict[str, torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each client's gradient separately."""
    squares = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
    coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for name, g in grads.items():
        grads[name] = g * coef.view(-1, *[1] * (g.dim() - 1))
