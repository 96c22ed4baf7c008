"""How client deltas move the hypernetwork (docs/concepts/hypernetwork.md, "Update").

A client trained theta_i and returned delta_i = theta_i - trained_i. Its step is one clipped
Adam step on the vector-Jacobian product J_i^T delta_i, the gradient of <theta_i(phi),
delta_i> with respect to everything that produced theta_i (feature extractor, its head, its
embeddings): the chain rule of the paper's update, with the delta as the upstream gradient.
The round schedules (server_app/schedules.py) decide which deltas go into which step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from server_app.generated_from import values_at
from server_app.hypernetwork_server import EmbeddedClient, HypernetworkServer
from server_app.server_state import UpdateRejected


def as_tensors(
    server: HypernetworkServer, deltas: Mapping[str, np.ndarray | torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The deltas as float32 tensors of their client's K, sorted by key (float sums must not
    depend on the order replies arrived in)."""
    tensors = {k: torch.as_tensor(np.asarray(deltas[k], dtype=np.float32)) for k in sorted(deltas)}
    for key, delta in tensors.items():
        expected = server.record(key).num_params
        if delta.shape != (expected,):
            raise ValueError(
                f"delta of {key!r} has shape {tuple(delta.shape)}, expected ({expected},)"
            )
    return tensors


def gradients(
    server: HypernetworkServer,
    deltas: Sequence[tuple[EmbeddedClient, torch.Tensor]],
    scale: float = 1.0,
    at: Mapping[torch.nn.Parameter, torch.Tensor] | None = None,
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """scale * sum_i J_i^T delta_i for the parameters that produced the thetas (those not
    frozen); returns {param: grad}. Clients of one tau are generated together, the groups in
    the order their first client appears. The Jacobians are taken at the parameters' current
    values, or at the values `at` gives (where the thetas were generated from)."""
    by_tau: dict[int, list[tuple[EmbeddedClient, torch.Tensor]]] = {}
    for record, delta in deltas:
        by_tau.setdefault(record.tau, []).append((record, delta))
    ordered = [pair for group in by_tau.values() for pair in group]
    records = [record for record, _ in ordered]
    params = server.trainable_parameters(records)
    if not params:
        return {}
    grad_outputs = [delta.to(server.device, torch.float32) * scale for _, delta in ordered]
    with values_at(at):
        outputs = server.thetas(records)
        grads = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, allow_unused=True)
    return {p: g for p, g in zip(params, grads, strict=True) if g is not None}


def clipped_step(
    server: HypernetworkServer, grads: Mapping[torch.nn.Parameter, torch.Tensor]
) -> float:
    """Clip the joint gradient norm, one Adam step; other parameters keep grad None.

    A gradient whose norm is not finite (a delta so large that its VJP overflows) is refused
    before anything changes: clipping would multiply it by 0 and write NaN into the shared
    feature extractor (UpdateRejected; the caller drops that client). Returns the norm.
    """
    if not grads:
        return 0.0
    optimizer = server.optimizer
    optimizer.zero_grad(set_to_none=True)
    for param, grad in grads.items():
        param.grad = grad
    try:
        norm = torch.nn.utils.clip_grad_norm_(
            list(grads), server.settings.grad_clip, error_if_nonfinite=True
        )
    except RuntimeError:
        optimizer.zero_grad(set_to_none=True)
        raise UpdateRejected("its update overflows (non-finite gradient norm)") from None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    server.generated_from.stepped()
    return float(norm)


def step_client(server: HypernetworkServer, key: str, delta: np.ndarray | torch.Tensor) -> float:
    """One clipped Adam step on one client's VJP at the current state; raises UpdateRejected,
    changing nothing, when the step would not be finite."""
    (tensor,) = as_tensors(server, {key: delta}).values()
    return clipped_step(server, gradients(server, [(server.record(key), tensor)]))


def step_mean(
    server: HypernetworkServer, deltas: Mapping[str, torch.Tensor]
) -> tuple[list[float], dict[str, str]]:
    """One step on the mean VJP; if it overflows, the clients whose own VJP overflows are
    dropped (with the reason) and the rest step together. Returns (norms, rejected)."""
    rejected: dict[str, str] = {}

    def pairs(keys) -> list[tuple[EmbeddedClient, torch.Tensor]]:
        return [(server.record(k), deltas[k]) for k in keys]

    try:
        return [clipped_step(server, gradients(server, pairs(deltas), 1.0 / len(deltas)))], {}
    except UpdateRejected:
        pass
    for key in list(deltas):
        grads = list(gradients(server, pairs([key])).values())
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            rejected[key] = "its update overflows (non-finite gradient norm)"
    kept = [k for k in deltas if k not in rejected]
    if not kept:
        return [], rejected
    try:
        return [clipped_step(server, gradients(server, pairs(kept), 1.0 / len(kept)))], rejected
    except UpdateRejected as err:  # together they still overflow: nobody steps
        rejected.update(dict.fromkeys(kept, str(err)))
        return [], rejected


def step_weighted(
    server: HypernetworkServer,
    record: EmbeddedClient,
    deltas: Sequence[np.ndarray],
    weights: Sequence[float],
) -> float:
    """One step on sum_i w_i VJP(theta, delta_i) = VJP(theta, sum_i w_i delta_i), for deltas
    that all trained the same vector (MH-pFedHNGD's phase 1: w_g, weights m_i / M)."""
    if not deltas:
        return 0.0
    combined = sum(
        w * torch.as_tensor(np.asarray(d, np.float32)) for d, w in zip(deltas, weights, strict=True)
    )
    if not torch.isfinite(combined).all():
        raise UpdateRejected("the weighted sum of the deltas overflows")
    return clipped_step(server, gradients(server, [(record, combined)]))
