"""Flat float32 parameter vectors (docs/concepts/protocol.md).

The hypernetwork speaks only in flat vectors of length K: it never sees a layer name or a shape.
These helpers are the single place that defines how a client's model maps to and from such a
vector, so the server's K and the client's layout cannot drift apart.

Only trainable parameters are in the vector. BatchNorm running statistics are *buffers*, not
parameters, so they never travel: they stay on the client between rounds
(docs/concepts/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import numpy as np
import torch
from torch import nn

__all__ = [
    "matching_parameter_names",
    "model_to_vector",
    "num_chunks",
    "parse_layer_patterns",
    "select_parameter_names",
    "vector_size",
    "vector_to_model",
]


def num_chunks(num_params: int, chunk_size: int) -> int:
    """tau = ceil(K / N): how many chunks (and embedding vectors) the hypernetwork generates a
    vector of K parameters from. Here, not in the server, because a site checks its own tau
    (client_app/check_model.py) against its layers, which the server never learns."""
    return math.ceil(num_params / chunk_size)


def select_parameter_names(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Names of the trainable parameters that make up the vector, in ``named_parameters()`` order.

    ``include``/``exclude`` are fnmatch patterns (e.g. ``"fc3.*"``) so a config can keep some
    layers local or frozen without knowing the full list of names. An include pattern that matches
    nothing is almost always a typo, so it is refused rather than silently shrinking K.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include/exclude must be sequences of patterns, not a single string")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if include is None:
        selected = list(trainable)
    else:
        unmatched = [pat for pat in include if not any(fnmatchcase(n, pat) for n in trainable)]
        if unmatched:
            raise ValueError(
                f"include pattern(s) {unmatched} match no trainable parameter; "
                f"available names: {trainable}"
            )
        selected = [n for n in trainable if any(fnmatchcase(n, pat) for pat in include)]
    if exclude:
        selected = [n for n in selected if not any(fnmatchcase(n, pat) for pat in exclude)]
    return selected


def parse_layer_patterns(spec: str) -> list[str]:
    """A layer selection as written in configs: "none" (or "") for nothing, else fnmatch
    patterns separated by "|" or "," (e.g. "classifier.5.*|features.0.*")."""
    if spec.strip().lower() in ("", "none"):
        return []
    return [p.strip() for p in spec.replace("|", ",").split(",") if p.strip()]


def matching_parameter_names(model: nn.Module, patterns: Sequence[str], what: str) -> list[str]:
    """Trainable parameter names matching any pattern, in ``named_parameters()`` order.

    One architecture may lack some patterns of a mode shared by several (``fc.*`` is ResNet's
    classifier, ``classifier.5.*`` LeNet's), but a selection that matches nothing at all is a
    typo and is refused, with the names that exist.
    """
    if not patterns:
        return []
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    names = [n for n in trainable if any(fnmatchcase(n, pat) for pat in patterns)]
    if not names:
        raise ValueError(
            f"{what} {list(patterns)} match no parameter of {type(model).__name__}; "
            f"its parameters are {trainable}"
        )
    return names


def _selected_parameters(
    model: nn.Module, names: Sequence[str] | None
) -> list[tuple[str, nn.Parameter]]:
    """Resolve ``names`` to parameters, always in ``named_parameters()`` order.

    The order of ``names`` itself is ignored on purpose: the layout must depend only on the model,
    so two callers passing the same set of names in a different order get the same vector.
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of parameter names, not a single string")
    if names is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    all_params = dict(model.named_parameters())
    unknown = [n for n in names if n not in all_params]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; model has {list(all_params)}")
    wanted = set(names)
    return [(n, p) for n, p in all_params.items() if n in wanted]


def vector_size(model: nn.Module, names: Sequence[str] | None = None) -> int:
    """K: the length of the model's vector (what a client reports to the server)."""
    return sum(p.numel() for _, p in _selected_parameters(model, names))


def model_to_vector(model: nn.Module, names: Sequence[str] | None = None) -> torch.Tensor:
    """The model's parameters as one 1-D float32 CPU tensor, detached from autograd.

    CPU and float32 regardless of the model's device and dtype, because the vector is what goes on
    the wire (4*K bytes) and what the server's hypernetwork compares against.
    """
    parts = [
        p.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        for _, p in _selected_parameters(model, names)
    ]
    if not parts:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(parts).contiguous()


def vector_to_model(
    model: nn.Module,
    vector: torch.Tensor | np.ndarray,
    names: Sequence[str] | None = None,
) -> None:
    """Copy ``vector`` into the selected parameters in place.

    In place (rather than rebuilding the model) so that optimizer references, the device placement
    and the BatchNorm running statistics the client keeps between rounds all survive. A length
    mismatch means the server and client disagree about the architecture; it is refused instead of
    being truncated or padded.
    """
    if isinstance(vector, np.ndarray):
        vector = torch.from_numpy(np.ascontiguousarray(vector))
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"vector must be a torch.Tensor or numpy.ndarray, got {type(vector)!r}")
    if vector.dim() != 1:
        raise ValueError(f"parameter vector must be 1-D, got shape {tuple(vector.shape)}")
    params = _selected_parameters(model, names)
    expected = sum(p.numel() for _, p in params)
    if vector.numel() != expected:
        raise ValueError(
            f"parameter vector has wrong length: expected {expected} (K of this model), "
            f"got {vector.numel()}"
        )
    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            chunk = vector[offset : offset + n].reshape(p.shape)
            p.copy_(chunk.to(device=p.device, dtype=p.dtype))
            offset += n
