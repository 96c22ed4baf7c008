"""Round schedules (SPEC section 4): how a round's client updates reach the hypernetwork.

- `one_by_one` (the authors' code, MH-pFedHN.py `for client_id in idc`): clients in a seeded
  order; each gets theta_i generated from the hypernetwork as it is now, trains, and the
  server steps before the next client's theta is generated.
- `parallel_sequential`: every client trains the round-start theta_i at once; the deltas are
  then applied one Adam step each, in the seeded order, each VJP at the already moved state.
- `parallel_mean`: the same round, one Adam step on the mean VJP at the round-start state.
- `parallel_residual`: the same round, one step per client in the seeded order on the residual
  theta_i(now) - trained_i, so a client's step shrinks by what earlier steps already moved
  its theta towards the vector it trained (the gradient of 1/2 ||theta_i(phi) - trained_i||^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.seeding import stable_seed

ONE_BY_ONE = "one_by_one"
PARALLEL_SEQUENTIAL = "parallel_sequential"
PARALLEL_MEAN = "parallel_mean"
PARALLEL_RESIDUAL = "parallel_residual"
SCHEDULES = (ONE_BY_ONE, PARALLEL_SEQUENTIAL, PARALLEL_MEAN, PARALLEL_RESIDUAL)


def client_order(seed: int, keys: Sequence[str], server_round: int) -> list[str]:
    """The round's seeded client order: a permutation of the sorted keys, so it does not
    depend on the order nodes connected or replies arrived."""
    ordered = sorted(keys)
    rng = np.random.default_rng(stable_seed(seed, "order", server_round))
    return [ordered[i] for i in rng.permutation(len(ordered))]
