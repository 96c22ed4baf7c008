"""Round schedules (docs/concepts/schedules.md): which clients train together, and how their
deltas become steps of the hypernetwork. One class each; `hypernetwork.schedule` names one.

- `one_by_one` (the authors' code, MH-pFedHN.py `for client_id in idc`): clients in a seeded
  order; each gets theta_i generated from the hypernetwork as it is now, trains, and the
  server steps before the next client's theta is generated.
- `parallel_sequential`: every client trains the round-start theta_i at once; the deltas are
  then applied one Adam step each, in the seeded order, each VJP at the already moved state.
- `parallel_mean`: the same round, one Adam step on the mean VJP at the round-start state.

Methods without a hypernetwork (Local, FedAvg) train every round in one cohort (`Parallel`)
and aggregate their own way. Pure logic: no Flower.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.seeding import stable_seed
from server_app import hypernetwork_steps as steps
from server_app.hypernetwork_server import HypernetworkServer
from server_app.server_state import UpdateRejected


def client_order(seed: int, keys: Sequence[str], server_round: int) -> list[str]:
    """The round's seeded client order: a permutation of the sorted keys, so it does not
    depend on the order nodes connected or replies arrived."""
    ordered = sorted(keys)
    rng = np.random.default_rng(stable_seed(seed, "order", server_round))
    return [ordered[i] for i in rng.permutation(len(ordered))]


@dataclass
class Applied:
    """What a schedule's steps did: their gradient norms, and the clients refused (with
    why) because their step would not be finite."""

    norms: list[float] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


class Parallel:
    """Every sampled client trains at once, in one exchange (the method aggregates)."""

    name = "parallel"
    one_exchange = True  # the round's train messages all carry the round-start vectors

    def cohorts(self, seed: int, keys: Sequence[str], server_round: int) -> Iterator[list[str]]:
        """The groups of clients trained in one exchange each, in order."""
        yield list(keys)

    def apply(
        self,
        server: HypernetworkServer,
        deltas: Mapping[str, np.ndarray],
        server_round: int,
    ) -> Applied:
        """The cohort's deltas as steps of the hypernetwork (each schedule its own way)."""
        raise NotImplementedError(f"{self.name} applies no hypernetwork steps")


class ParallelSequential(Parallel):
    name = "parallel_sequential"

    def apply(self, server, deltas, server_round) -> Applied:
        tensors = steps.as_tensors(server, deltas)
        return _each(server, tensors, client_order(server.seed, list(tensors), server_round))


class ParallelMean(Parallel):
    name = "parallel_mean"

    def apply(self, server, deltas, server_round) -> Applied:
        tensors = steps.as_tensors(server, deltas)
        if not tensors:
            return Applied()
        norms, rejected = steps.step_mean(server, tensors)
        return Applied(norms, rejected)


class OneByOne(Parallel):
    name = "one_by_one"
    one_exchange = False  # every client's vector comes after the step before it

    def cohorts(self, seed: int, keys: Sequence[str], server_round: int) -> Iterator[list[str]]:
        for key in client_order(seed, keys, server_round):
            yield [key]

    def apply(self, server, deltas, server_round) -> Applied:
        tensors = steps.as_tensors(server, deltas)
        return _each(server, tensors, list(tensors))


def _each(
    server: HypernetworkServer, tensors: Mapping[str, torch.Tensor], order: Sequence[str]
) -> Applied:
    """One step per client, in `order`, each at the state the previous one left."""
    applied = Applied()
    for key in order:
        try:
            applied.norms.append(
                steps.clipped_step(
                    server, steps.gradients(server, [(server.record(key), tensors[key])])
                )  # fmt: skip
            )
        except UpdateRejected as err:
            applied.rejected[key] = str(err)
    return applied


SCHEDULES: dict[str, type[Parallel]] = {
    s.name: s for s in (OneByOne, ParallelSequential, ParallelMean)
}


def schedule_named(name: str) -> Parallel:
    try:
        return SCHEDULES[name]()
    except KeyError:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}") from None
