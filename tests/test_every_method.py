"""What every registered method must do, whatever it is: run with partial participation on
the real ClientApp, with either engine, and continue from a checkpoint exactly as if it had
never stopped (its clients' state restored with it)."""

from __future__ import annotations

import json

import pytest

from client_app.app import app as client_app
from common import protocol
from common.config import resolve_config
from common.methods import METHODS
from server_app.round_loop import RoundLoop
from server_app.run import run_experiment
from simulation.batched_grid import BatchedGrid
from simulation.grid import InProcessGrid
from tests.tiny_runs import tiny_data

TIMINGS = {"seconds", "exchange_seconds", "client_seconds", "server_update_seconds",
           "server_seconds_per_client_update", "global_update_seconds"}  # fmt: skip


def run(method: str, tiny_npz, tmp_path, name: str, rounds: int, engine: str = "loop",
        resume: str = "", **extra) -> list[dict]:  # fmt: skip
    models = "lenet,mlp" if METHODS[method].heterogeneous else "lenet"
    run_cfg = {
        "method": method,
        **tiny_data(tiny_npz, tmp_path, 4),
        "clients.models": models,
        "client.lr": 0.05,
        "rounds": rounds,
        "engine": engine,
        "server.fraction_train": 0.75,  # 3 of the 4 clients train each round
        "server.min_nodes": 4,
        "server.wait_for_nodes_s": 0,
        "server.checkpoint_every": 1,
        "server.output_root": str(tmp_path / "out"),
        "server.run_name": name,
        "server.resume": resume,
        "client.state_dir": str(tmp_path / f"{name}-clients"),
        "global_model.architecture": "lenet",
        "hypernetwork.hidden_dim": 16,  # small heads: this is about the round, not the size
        "pfedlhn.hidden_dim": 16,
        **extra,
    }
    cfg = resolve_config("default", run_cfg)
    grid_class = BatchedGrid if engine == "batched" else InProcessGrid
    run_experiment(grid_class.simulation(client_app, 4, run_cfg), cfg, "t")
    rows = (tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k not in TIMINGS} for r in rows]


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_partially_and_resumes_bit_for_bit(
    method, tiny_npz, tmp_path, monkeypatch
):
    """The server dies after round 3 is logged, before its checkpoint: the run continues
    from round 2's checkpoint and ends exactly where an uninterrupted run does."""
    whole = run(method, tiny_npz, tmp_path, "whole", 4)
    assert [r["round"] for r in whole] == [0, 1, 2, 3, 4]
    assert all(r["clients_trained"] == 3 for r in whole[1:]), [r["rejected"] for r in whole]
    assert not any(r["rejected"] for r in whole)
    original = RoundLoop.checkpoint

    def dies_in_round_three(self, server_round, num_rounds, pending):
        if server_round == 3:
            raise Killed
        return original(self, server_round, num_rounds, pending)

    monkeypatch.setattr(RoundLoop, "checkpoint", dies_in_round_three)
    with pytest.raises(Killed):
        run(method, tiny_npz, tmp_path, "split", 4)
    monkeypatch.setattr(RoundLoop, "checkpoint", original)
    resumed = run(method, tiny_npz, tmp_path, "split", 4,
                  resume=str(tmp_path / "out" / "split"))  # fmt: skip
    assert resumed == whole


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_batched_engine_gives_every_method_the_loops_results(method, tiny_npz, tmp_path):
    """On the CPU the batched engine trains plain jobs client by client (threads): the same
    arithmetic, so the same rows; methods with their own objectives go one by one."""
    loop = run(method, tiny_npz, tmp_path, "loop", 2)
    batched = run(method, tiny_npz, tmp_path, "batched", 2, engine="batched")
    assert batched == loop


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_delta_a_method_parses_passes_the_norm_bound(method, tiny_npz, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """`server.delta_norm_bound` is a defence of the server, not of some methods: every
    train reply's delta parsed (both phases of MH-pFedHNGD included) goes through it."""
    parsed, bounded = [], []
    parse, bound = protocol.parse_train_reply, RoundLoop.bounded

    def counted_parse(*args, **kwargs):
        parsed.append(result := parse(*args, **kwargs))
        return result

    def counted_bound(self, server_round, key, result):
        bounded.append(result)
        return bound(self, server_round, key, result)

    monkeypatch.setattr(protocol, "parse_train_reply", counted_parse)
    monkeypatch.setattr(RoundLoop, "bounded", counted_bound)
    run(method, tiny_npz, tmp_path, "bound", 1, **{"server.delta_norm_bound": 3.0})
    assert {id(r) for r in parsed} <= {id(r) for r in bounded}, f"{len(parsed)} parsed"
