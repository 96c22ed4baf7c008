"""One exchange per round: a round's evaluation travels with the next round's train messages
(the client evaluates what it receives before it trains). The numbers are those of separate
evaluate messages; only the bytes and the number of exchanges go down."""

from __future__ import annotations

import pytest

from client_app.app import app as client_app
from common.config import resolve_config
from server_app.run import run_experiment
from simulation.grid import InProcessGrid
from tests.tiny_runs import tiny_data

TIMING = {"seconds", "server_update_seconds", "server_seconds_per_client_update",
          "exchanges", "exchange_seconds", "client_seconds"}  # fmt: skip


class Stop(Exception):
    pass


class CountingGrid(InProcessGrid):
    pushes = 0
    stop_at: int | None = None  # raise at this push, as a server killed mid-round

    def push_messages(self, messages):
        CountingGrid.pushes += 1
        if CountingGrid.pushes == CountingGrid.stop_at:
            raise Stop
        return super().push_messages(messages)


def run(tiny_npz, tmp_path, method, fuse, name, rounds=3, **extra):
    run_cfg = {
        "method": method,
        **tiny_data(tiny_npz, tmp_path, 4),
        "clients.models": "lenet" if method == "fedavg" else "lenet,mlp",
        "rounds": rounds,
        "server.min_nodes": 4,
        "server.wait_for_nodes_s": 0,
        "server.output_root": str(tmp_path / "out"),
        "server.run_name": name,
        "server.fuse_evaluation": fuse,
        "client.state_dir": str(tmp_path / name / "clients"),
        "hypernetwork.schedule": "parallel_sequential",
        **extra,
    }
    cfg = resolve_config("default", run_cfg)
    CountingGrid.pushes = 0
    strategy = run_experiment(CountingGrid.simulation(client_app, 4, run_cfg), cfg, name)
    return strategy.history, CountingGrid.pushes


@pytest.mark.parametrize("method", ["mh_pfedhn", "local", "fedavg"])
def test_fused_rounds_give_the_same_numbers_in_fewer_exchanges(method, tiny_npz, tmp_path):
    separate, separate_pushes = run(tiny_npz, tmp_path, method, False, f"{method}-separate")
    fused, fused_pushes = run(tiny_npz, tmp_path, method, True, f"{method}-fused")
    assert [r["round"] for r in fused] == [0, 1, 2, 3]
    for a, b in zip(separate, fused, strict=True):
        same = {k: v for k, v in a.items() if k not in TIMING | {"bytes_down"}}
        assert same == {k: v for k, v in b.items() if k not in TIMING | {"bytes_down"}}
        assert b["accuracy"] is not None
    assert fused_pushes == separate_pushes - 3  # rounds 0, 1, 2 ride on the next round
    if method != "local":
        assert sum(r["bytes_down"] for r in fused) < sum(r["bytes_down"] for r in separate)


def test_partial_participation_evaluates_the_others_in_the_same_exchange(tiny_npz, tmp_path):
    half = {"server.fraction_train": 0.5}
    separate, _ = run(tiny_npz, tmp_path, "mh_pfedhn", False, "half-separate", **half)
    fused, pushes = run(tiny_npz, tmp_path, "mh_pfedhn", True, "half-fused", **half)
    assert [r["clients_evaluated"] for r in fused] == [4, 4, 4, 4]
    assert [r["accuracy"] for r in fused] == [r["accuracy"] for r in separate]


def test_a_resumed_run_completes_the_round_that_awaited_its_evaluation(tiny_npz, tmp_path):
    """Killed in round 3 (push 4: the query, then one exchange per round), the checkpoint of
    round 2 holds round 2's row, still waiting for its evaluation; the resumed run gets it
    from round 3's exchange and ends exactly where an uninterrupted run does."""
    whole, _ = run(tiny_npz, tmp_path, "mh_pfedhn", True, "whole", rounds=4)
    CountingGrid.stop_at = 4
    try:
        with pytest.raises(Stop):
            run(tiny_npz, tmp_path, "mh_pfedhn", True, "split", rounds=4)
    finally:
        CountingGrid.stop_at = None
    resume = {"server.resume": str(tmp_path / "out" / "split")}
    history, _ = run(tiny_npz, tmp_path, "mh_pfedhn", True, "split", rounds=4, **resume)
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert [r["accuracy"] for r in history] == [r["accuracy"] for r in whole]


def test_a_round_with_no_one_to_train_still_evaluates_the_round_before(
    tiny_npz, tmp_path, monkeypatch
):
    """Round 2 trains nobody (say every eligible client is gone): its exchange still goes
    out, with the evaluate messages that carry round 1's evaluation, and no row lacks one."""
    from server_app.methods.mh_pfedhn import MHpFedHN

    eligible = MHpFedHN.eligible
    nobody_in_round_2 = lambda self, r, keys: [] if r == 2 else eligible(self, r, keys)  # noqa: E731
    monkeypatch.setattr(MHpFedHN, "eligible", nobody_in_round_2)
    history, _ = run(tiny_npz, tmp_path, "mh_pfedhn", True, "idle")
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert history[2]["clients_trained"] == 0
    assert all(r["accuracy"] is not None for r in history)
    assert history[1]["clients_evaluated"] == 4
