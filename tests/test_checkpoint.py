"""Checkpoints: written atomically each round; a resumed run continues bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from common.config import resolve_config
from server_app.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from server_app.hypernetwork_server import HypernetworkServer, HypernetworkSettings
from server_app.methods.mh_pfedhn import MHpFedHN
from server_app.outputs import RunRecorder
from server_app.run import build_state, resume_state, run_experiment
from server_app.schedules import ParallelSequential
from simulation.grid import InProcessGrid
from tests.test_strategy import SMALL, scripted_app


def tensors(server: HypernetworkServer) -> dict[str, torch.Tensor]:
    out = {f"hnet.{k}": v for k, v in server.hnet.state_dict().items()}
    out.update({f"emb.{k}": v.detach() for k, v in server.embeddings.items()})
    for i, state in server.optimizer.state_dict()["state"].items():
        out.update({f"adam.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return out


def assert_identical(a: HypernetworkServer, b: HypernetworkServer) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert a.clients == b.clients


def run(tmp_path, name, rounds, resume=""):
    overrides = {
        **SMALL,
        "rounds": rounds,
        "server.output_root": str(tmp_path),
        "server.run_name": name,
        "server.resume": resume,
    }
    cfg = resolve_config("default", overrides)
    grid = InProcessGrid(
        scripted_app({}, {0: 40, 1: 100, 2: 40}), [{"partition-id": i} for i in range(3)], {}
    )
    return run_experiment(grid, cfg, run_id=0)


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    server = HypernetworkServer(HypernetworkSettings(chunk_size=16, embedding_dim=4), seed=5)
    server.register("a", 40)
    server.register("b", 100)
    ParallelSequential().apply(
        server, {"a": torch.ones(40).numpy(), "b": torch.ones(100).numpy()}, 1
    )
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, Checkpoint(server, 1, [{"round": 1}]))
    checkpoint = load_checkpoint(path, HypernetworkServer)
    loaded = checkpoint.server
    assert (checkpoint.round, checkpoint.history) == (1, [{"round": 1}])
    assert_identical(server, loaded)
    assert not list(tmp_path.glob("*.tmp"))
    # the loaded optimizer keeps going exactly like the original
    for s in (server, loaded):
        ParallelSequential().apply(s, {"a": torch.full((40,), 0.5).numpy()}, 2)
    assert_identical(server, loaded)


class ServerStopped(Exception):
    pass


def test_resume_after_round_two_of_four_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = run(tmp_path, "whole", rounds=4)
    # a 4-round run whose server side stops when round 3 begins
    at_stop = {}
    original = MHpFedHN.train_round

    def stop_at_round_three(self, grid, server_round, *args, **kwargs):
        if server_round == 3:
            at_stop["server"] = copy.deepcopy(self.state)
            raise ServerStopped
        return original(self, grid, server_round, *args, **kwargs)

    monkeypatch.setattr(MHpFedHN, "train_round", stop_at_round_three)
    with pytest.raises(ServerStopped):
        run(tmp_path, "split", rounds=4)
    monkeypatch.setattr(MHpFedHN, "train_round", original)
    saved = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME, HypernetworkServer)
    assert saved.round == 2
    assert_identical(at_stop["server"], saved.server)
    resumed = run(tmp_path, "split", rounds=4, resume=str(tmp_path / "split"))
    assert_identical(whole.state, resumed.state)
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # none lost, none repeated
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in whole.history]


def test_resume_with_other_hypernetwork_settings_is_refused(tmp_path):
    run(tmp_path, "run", rounds=1)
    cfg = resolve_config(
        "default",
        {
            **SMALL,
            "hypernetwork.hidden_dim": 32,
            "server.output_root": str(tmp_path),
            "server.resume": str(tmp_path / "run"),
        },
    )
    grid = InProcessGrid(scripted_app({}, {}), [{"partition-id": 0}], {})
    with pytest.raises(ValueError, match="resume with the same.*hypernetwork.hidden_dim: 8 -> 32"):
        run_experiment(grid, cfg, run_id=0)


def test_resume_from_a_directory_without_checkpoint_says_so(tmp_path):
    cfg = resolve_config("default", {**SMALL, "server.resume": str(tmp_path / "nothing")})
    grid = InProcessGrid(scripted_app({}, {}), [{"partition-id": 0}], {})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_experiment(grid, cfg, run_id=0)


BUDGETS = {"server.memory_budget_gb": 0.5, "server.client_memory_gb": 0.01}


@pytest.mark.parametrize("method", ["mh_pfedhn", "pfedhn", "pfedlhn", "mh_pfedhngd"])
def test_every_hypernetwork_state_takes_the_memory_budgets_of_the_configuration(method):
    state = build_state(resolve_config("default", {**SMALL, **BUDGETS, "method": method}))
    assert (state.memory_budget, state.client_quota) == (500_000_000, 10_000_000)


def test_a_resumed_run_takes_the_memory_budgets_of_the_configuration(tmp_path):
    """They are budgets, not state: a resumed run fell back to "auto" for the client's."""
    settings = {**SMALL, **BUDGETS, "server.output_root": str(tmp_path), "server.run_name": "run"}
    grid = InProcessGrid(scripted_app({}, {}), [{"partition-id": i} for i in range(2)], {})
    run_experiment(grid, resolve_config("default", settings), run_id=0)
    resume = {**settings, "rounds": 2, "server.resume": str(tmp_path / "run")}
    resumed, _, _ = resume_state(resolve_config("default", resume))
    assert (resumed.memory_budget, resumed.client_quota) == (500_000_000, 10_000_000)


def test_a_fresh_run_into_a_folder_that_holds_a_run_is_refused_and_loses_nothing(tmp_path):
    """server.run_name fixed and run again without server.resume: the first run's rows and
    config stay as they were (they were appended to and overwritten)."""
    run(tmp_path, "named", rounds=1)
    before = {f: (tmp_path / "named" / f).read_bytes() for f in ("metrics.jsonl", "config.yaml")}
    with pytest.raises(ValueError, match=r"holds a run already.*server.resume="):
        run(tmp_path, "named", rounds=2)
    (tmp_path / "named" / CHECKPOINT_NAME).unlink()
    with pytest.raises(ValueError, match="no checkpoint to continue from"):
        run(tmp_path, "named", rounds=2)
    assert before == {f: (tmp_path / "named" / f).read_bytes() for f in before}


def test_runs_named_auto_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr("time.strftime", lambda _: "20261206-120000")
    cfg = resolve_config("default", {**SMALL, "server.output_root": str(tmp_path)})
    folders = [RunRecorder.create(cfg, run_id=7).directory for _ in range(3)]
    assert [f.name for f in folders] == [
        f"{cfg.name}-20261206-120000-run7", f"{cfg.name}-20261206-120000-run7-2",
        f"{cfg.name}-20261206-120000-run7-3",
    ]  # fmt: skip
