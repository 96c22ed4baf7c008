"""Round schedules (docs/concepts/schedules.md): which clients train together, and how their
deltas become steps of the hypernetwork. One class each; `hypernetwork.schedule` names one.

- `one_by_one` (the authors' code, MH-pFedHN.py `for client_id in idc`): clients in a seeded
  order; each gets theta_i generated from the hypernetwork as it is now, trains, and the
  server steps before the next client's theta is generated.
- `parallel_sequential`: every client trains the round-start theta_i at once; the deltas are
  then applied one Adam step each, in the seeded order, each VJP at the already moved state.
- `parallel_mean`: the same round, one Adam step on the mean VJP at the round-start state.
- `cohorts`: `hypernetwork.in_flight` clients at a time train the vectors generated at the
  same state, then step one by one in the seeded order (parallel_sequential in groups of c).

Clients in flight (`hypernetwork.in_flight` c, one_by_one): the next client's vector is
generated as soon as the delta c clients back has been applied, so c clients train at once,
and every delta is applied in the seeded order, at most c - 1 steps after its vector was
generated (bounded staleness, as in FedAsync and FedBuff). c = 1 is the authors' round. Its
VJP is taken at the state the vector came from or at the current one (`hypernetwork.vjp_at`).

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

    def __init__(self, in_flight: int = 1, vjp_at: str = "current") -> None:
        self.size = in_flight  # clients per cohort (`cohorts`), or in flight (`one_by_one`)
        self.vjp_at = vjp_at

    @property
    def in_flight(self) -> int:
        """Cohorts sent before the first of them is applied."""
        return 1

    @property
    def remembers_generation(self) -> bool:
        """Whether a delta's VJP is taken where its vector came from, and that can differ
        from the state at its step (only then are the values kept)."""
        return self.vjp_at == "generated"

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

    def apply(
        self, server: HypernetworkServer, deltas: Mapping[str, np.ndarray], server_round: int
    ) -> Applied:
        tensors = steps.as_tensors(server, deltas)
        order = client_order(server.seed, list(tensors), server_round)
        return _each(server, tensors, order, self.remembers_generation)


class ParallelMean(Parallel):
    name = "parallel_mean"
    remembers_generation = False  # its one step is at the round-start state anyway

    def apply(
        self, server: HypernetworkServer, deltas: Mapping[str, np.ndarray], server_round: int
    ) -> Applied:
        tensors = steps.as_tensors(server, deltas)
        if not tensors:
            return Applied()
        norms, rejected = steps.step_mean(server, tensors)
        return Applied(norms, rejected)


class Cohorts(ParallelSequential):
    name = "cohorts"
    one_exchange = False

    def cohorts(self, seed: int, keys: Sequence[str], server_round: int) -> Iterator[list[str]]:
        order = client_order(seed, keys, server_round)
        for start in range(0, len(order), self.size):
            yield order[start : start + self.size]

    @property
    def remembers_generation(self) -> bool:
        return self.vjp_at == "generated" and self.size > 1


class OneByOne(Parallel):
    name = "one_by_one"
    one_exchange = False  # every client's vector comes after the step before it

    @property
    def in_flight(self) -> int:
        return self.size

    @property
    def remembers_generation(self) -> bool:
        return self.vjp_at == "generated" and self.size > 1

    def cohorts(self, seed: int, keys: Sequence[str], server_round: int) -> Iterator[list[str]]:
        for key in client_order(seed, keys, server_round):
            yield [key]

    def apply(
        self, server: HypernetworkServer, deltas: Mapping[str, np.ndarray], server_round: int
    ) -> Applied:
        tensors = steps.as_tensors(server, deltas)
        return _each(server, tensors, list(tensors), self.remembers_generation)


def _each(
    server: HypernetworkServer,
    tensors: Mapping[str, torch.Tensor],
    order: Sequence[str],
    at_generation: bool = False,
) -> Applied:
    """One step per client, in `order`, each at the state the previous one left (its VJP
    there, or where its vector came from: `at_generation`)."""
    applied = Applied()
    for key in order:
        at = server.generated_from.take(key) if at_generation else None
        pairs = [(server.record(key), tensors[key])]
        try:
            applied.norms.append(steps.clipped_step(server, steps.gradients(server, pairs, at=at)))
        except UpdateRejected as err:
            applied.rejected[key] = str(err)
    return applied


SCHEDULES: dict[str, type[Parallel]] = {
    s.name: s for s in (OneByOne, Cohorts, ParallelSequential, ParallelMean)
}


def schedule_named(name: str, in_flight: int = 1, vjp_at: str = "current") -> Parallel:
    """The schedule of this name; `in_flight` is one_by_one's clients in flight and the
    size of a `cohorts` cohort."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    try:
        return SCHEDULES[name](in_flight, vjp_at)
    except KeyError:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}") from None
