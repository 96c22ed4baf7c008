"""The parameter values each in-flight client's vector was generated from.

With `hypernetwork.in_flight` c > 1, other clients' steps move the hypernetwork while a
client trains. `hypernetwork.vjp_at: generated` takes the client's VJP at the values its
theta came from (as asynchronous SGD with stale gradients does), so the server keeps them
from sending to applying: only the tensors that client's step touches (the feature extractor,
its head, its embeddings), each stored once per step of the hypernetwork however many clients
were generated between the same two steps. Pure PyTorch.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn


class GeneratedFrom:
    def __init__(self) -> None:
        self.step = 0  # steps of the hypernetwork so far (a version of its values)
        self.values: dict[tuple[int, int], torch.Tensor] = {}  # (step, id(param)) -> value
        self.users: Counter[tuple[int, int]] = Counter()
        self.of: dict[str, list[tuple[nn.Parameter, tuple[int, int]]]] = {}

    def stepped(self) -> None:
        """The hypernetwork's values changed (an optimizer step)."""
        self.step += 1

    def remember(self, key: str, params: Sequence[nn.Parameter]) -> None:
        """`key`'s vector was just generated from these parameters' current values."""
        self.forget(key)
        entries = []
        for param in params:
            slot = (self.step, id(param))
            if slot not in self.values:
                self.values[slot] = param.detach().clone()
            self.users[slot] += 1
            entries.append((param, slot))
        self.of[key] = entries

    def take(self, key: str) -> dict[nn.Parameter, torch.Tensor] | None:
        """The values `key`'s vector came from (None if none were remembered); forgets them."""
        entries = self.of.get(key)
        if entries is None:
            return None
        values = {param: self.values[slot] for param, slot in entries}
        self.forget(key)
        return values

    def forget(self, key: str) -> None:
        for _, slot in self.of.pop(key, []):
            self.users[slot] -= 1
            if not self.users[slot]:
                del self.users[slot], self.values[slot]

    def clear(self) -> None:
        """Forget every client (a round is over: nothing is in flight)."""
        for key in list(self.of):
            self.forget(key)

    def __len__(self) -> int:
        """How many distinct tensors are kept."""
        return len(self.values)


@contextlib.contextmanager
def values_at(values: Mapping[nn.Parameter, torch.Tensor] | None) -> Iterator[None]:
    """Within the block, these parameters hold the given values (autograd differentiates at
    them); their own values come back afterwards, even on an error."""
    if not values:
        yield
        return
    saved = {param: param.data for param in values}
    try:
        for param, value in values.items():
            param.data = value
        yield
    finally:
        for param, data in saved.items():
            param.data = data
