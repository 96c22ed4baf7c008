"""Local training and evaluation of a client model, in plain PyTorch (docs/concepts/training.md).

Data are tensors already in memory; batches are drawn from a seeded permutation instead of a
DataLoader, so a client's data order depends only on (seed, round, client) and costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ClientTrainConfig
from common.seeding import stable_seed


@dataclass(frozen=True)
class SGDSettings:
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 2
    grad_clip: float = 50.0
    memory_format: str = "contiguous"  # or channels_last, or auto (memory_format_for)

    @classmethod
    def from_config(cls, client: ClientTrainConfig) -> SGDSettings:
        return cls(**client.model_dump(include=set(cls.__dataclass_fields__)))


def memory_format_for(model: nn.Module, setting: str) -> torch.memory_format | None:
    """The memory format a model trains and evaluates in (None: as it is).

    auto: channels-last for convolutional models on the CPU, where it measured 1.4-2.4x
    faster per step here (LeNet 2.4x, ResNet18 1.4x, one thread); contiguous elsewhere (not
    measured on GPUs). Either way the parameters keep their values and the vector its order
    (`model_to_vector` flattens logically); only float rounding may differ.
    """
    if setting == "contiguous":
        return None
    if setting == "channels_last":
        return torch.channels_last
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    on_cpu = next(model.parameters()).device.type == "cpu"
    return torch.channels_last if convolutional and on_cpu else None


def _batch(x: torch.Tensor, device: torch.device, layout: torch.memory_format | None):
    if layout is None or x.dim() != 4:
        return x.to(device)
    return x.to(device).contiguous(memory_format=layout)


class MomentumSGD:
    """torch.optim.SGD's update (momentum, weight decay, no dampening or Nesterov), step for
    step the same floats (tested), without torch.optim: its first use imports torch._dynamo,
    2-5 s in every fresh ClientApp process a deployed message starts."""

    def __init__(
        self, params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float
    ) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if not self.momentum:
                p.add_(grad, alpha=-self.lr)
                continue
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = torch.clone(grad).detach()
            else:
                buf.mul_(self.momentum).add_(grad)
            p.add_(buf, alpha=-self.lr)


class Objective:
    """What a client minimises on a batch, beyond plain cross-entropy (None in `train_sgd`):
    a method's extra loss terms (distillation, a proximal term) live in one of these."""

    def setup(self, memory_format: torch.memory_format | None) -> None:
        """Before the first batch (e.g. put a teacher model in eval mode)."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


@contextlib.contextmanager
def seeded_global_generator(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Dropout (and any draw a model makes in `forward`) uses torch's global generator: seed it
    from the client's own generator's seed, without drawing from that one (the data order
    stays what it was), so that such a model repeats its numbers with the run's seed."""
    seed = stable_seed(generator.initial_seed(), "forward")
    cuda = []
    if device.type == "cuda":
        cuda = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)  # only what is forked and restored
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def train_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: SGDSettings,
    generator: torch.Generator,
    objective: Objective | None = None,
) -> float:
    """Epochs of SGD with per-step gradient clipping; mean batch loss.

    Cross-entropy, or the method's `objective` when it has one.
    """
    layout = memory_format_for(model, settings.memory_format)
    if layout is not None:
        model.to(memory_format=layout)  # in place: the parameters keep their identity
    model.train()
    if objective is not None:
        objective.setup(layout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = MomentumSGD(params, settings.lr, settings.momentum, settings.weight_decay)
    device = next(model.parameters()).device
    # summed on the device in float64 (as Python floats would be): no GPU sync per step
    total, batches = torch.zeros((), dtype=torch.float64, device=device), 0
    with seeded_global_generator(generator, device):  # dropout repeats with the seed
        for _ in range(settings.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), settings.batch_size):
                idx = order[start : start + settings.batch_size]
                xb, yb = _batch(x[idx], device, layout), y[idx].to(device)
                optimizer.zero_grad()
                logits = model(xb)
                if objective is None:
                    loss = F.cross_entropy(logits, yb)
                else:
                    loss = objective(model, xb, logits, yb)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                total += loss.detach()
                batches += 1
    return float(total) / max(batches, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
    memory_format: str = "contiguous",
) -> tuple[int, float]:
    """(correct, summed cross-entropy) over the given split, in eval mode."""
    layout = memory_format_for(model, memory_format)
    if layout is not None:
        model.to(memory_format=layout)
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(y), batch_size):
        xb = _batch(x[start : start + batch_size], device, layout)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    return int(correct), float(loss_sum)
