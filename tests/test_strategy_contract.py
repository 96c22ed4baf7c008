"""RoundLoop keeps Flower's Strategy contract: the hooks have Flower's signatures, an override
written as for Flower's own strategies works, `start` honours its arguments and returns a filled
`Result`, and construction order does not matter."""

from __future__ import annotations

import inspect
import time

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result, Strategy

from common.config import resolve_config
from server_app.methods.mh_pfedhn import MHpFedHN
from server_app.round_loop import RoundLoop
from server_app.run import build_state, build_strategy
from simulation.grid import InProcessGrid
from tests.test_strategy import SMALL, scripted_app


def setup(method: str = "mh_pfedhn", **extra):
    cfg = resolve_config("default", {**SMALL, "rounds": 5, "method": method, **extra})
    grid = InProcessGrid(scripted_app({}, {}), [{"partition-id": i} for i in range(3)], {})
    return cfg, grid


def test_the_hooks_have_flowers_signatures():
    for name in ("configure_train", "aggregate_train", "configure_evaluate",
                 "aggregate_evaluate", "start", "summary"):  # fmt: skip
        ours = list(inspect.signature(getattr(RoundLoop, name)).parameters)
        flowers = list(inspect.signature(getattr(Strategy, name)).parameters)
        assert ours == flowers, name
    assert issubclass(RoundLoop, Strategy)


def test_start_honours_num_rounds_and_returns_a_filled_result():
    cfg, grid = setup()
    strategy = build_strategy(cfg)
    seen = []

    def evaluate_fn(server_round, arrays):
        seen.append(server_round)
        return MetricRecord({"x": server_round})

    result = strategy.start(grid, num_rounds=2, timeout=30, evaluate_fn=evaluate_fn)
    assert isinstance(result, Result)
    assert [r["round"] for r in strategy.history] == [0, 1, 2]  # not the experiment's 5
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["clients_trained"] == 3
    assert sorted(result.evaluate_metrics_clientapp) == [0, 1, 2]
    assert 0 <= result.evaluate_metrics_clientapp[2]["accuracy"] <= 1
    assert seen == [0, 1, 2] and strategy.history[-1]["server_x"] == 2
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]


def test_fedavg_starts_from_the_initial_arrays_and_returns_the_final_model():
    from tests.test_hardening import SIZE, app_with

    cfg, _ = setup("fedavg")
    strategy = build_strategy(cfg)
    grid = InProcessGrid(app_with(), [{"partition-id": i} for i in range(3)], {})
    start = np.full(SIZE, 0.5, np.float32)
    result = strategy.start(grid, ArrayRecord({"w": Array(start)}), num_rounds=1)
    assert strategy.history[-1]["accuracy"] is not None
    final = result.arrays["w"].numpy()
    assert final.shape == (SIZE,) and not np.array_equal(final, start)
    assert np.array_equal(final, strategy.state.weights)


def test_a_flower_style_override_of_configure_train_reaches_the_clients():
    """As Flower's FedProx adds its proximal mu: override, add to config, call super()."""
    received = []

    class Tagged(MHpFedHN):
        def configure_train(self, server_round, arrays, config, grid):
            config["tag"] = 10 * server_round
            return super().configure_train(server_round, arrays, config, grid)

    cfg, grid = setup()
    inner = grid.client_app

    def recording(message, context):
        if message.metadata.message_type == "train":
            received.append(message.content["config"]["tag"])
        return inner(message, context)

    grid.client_app = recording
    Tagged(build_state(cfg), cfg).start(grid, num_rounds=2)
    assert received == [10] * 3 + [20] * 3  # every client, one_by_one cohorts of one


def test_start_honours_the_timeout():
    cfg, grid = setup(**{"hypernetwork.schedule": "parallel_mean"})
    inner = grid.client_app

    def slow(message, context):
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == 2:
            time.sleep(1.5)
        return inner(message, context)

    grid.client_app = slow
    strategy = build_strategy(cfg)
    strategy.start(_DelayedGrid(grid), num_rounds=1, timeout=0.5)
    row = strategy.history[-1]
    assert row["clients_trained"] == 2
    assert {"client": "c2", "reason": "no reply before the timeout"} in row["rejected"]


class _DelayedGrid(InProcessGrid):
    """The in-process grid answers at once; this one lets a reply arrive only after the
    ClientApp's own time, so a timeout can pass (it reuses the wrapped grid's nodes)."""

    def __init__(self, grid: InProcessGrid) -> None:
        self.__dict__.update(grid.__dict__)
        self.ready: dict[str, float] = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            started = time.monotonic()
            ids += list(super().push_messages([message]))
            self.answer_queued()
            self.ready[ids[-1]] = time.monotonic() - started + time.monotonic()
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        return super().pull_messages([i for i in message_ids if self.ready.get(i, 0) <= now])


def test_construction_order_does_not_matter():
    """A subclass may set what its hooks use after super().__init__: nothing overridable runs
    in the constructor (restoring a checkpoint happens in start)."""

    class Late(MHpFedHN):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra_calls = 0

        def restore(self, state):
            self.extra_calls += 1
            super().restore(state)

        def eligible(self, server_round, keys):
            self.extra_calls += 1
            return super().eligible(server_round, keys)

    cfg, grid = setup()
    strategy = Late(build_state(cfg), cfg)
    strategy.start(grid, num_rounds=1)
    assert strategy.extra_calls == 1  # eligible, once; restore only when resuming
