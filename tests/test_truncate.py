"""A run cut at round N equals an N-round run of the same config and seed (the claim that lets
a 150-round run's first 80 rounds stand beside an 80-round sweep)."""

from __future__ import annotations

import json

import pytest

from experiments.truncate import main, truncate
from tests.tiny_runs import tiny_data


def _run(tiny_npz, tmp_path, name, rounds):
    from common.config import resolve_config
    from simulation.run import run_inprocess

    overrides = {**tiny_data(tiny_npz, tmp_path, 3), "method": "mh_pfedhn", "rounds": rounds,
                 "data.val_fraction": 0.2, "server.min_nodes": 1,
                 "server.output_root": str(tmp_path), "server.run_name": name}  # fmt: skip
    run_inprocess(resolve_config("default", overrides), overrides)
    return tmp_path / name


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    return value


def test_a_run_cut_at_round_n_is_the_n_round_run(tiny_npz, tmp_path):
    short, long = _run(tiny_npz, tmp_path, "short", 2), _run(tiny_npz, tmp_path, "long", 3)
    summary = truncate(long, tmp_path / "cut", 2, experiment="exp")
    cut = tmp_path / "cut"
    rows = {d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (short, cut)}  # fmt: skip
    assert [r["round"] for r in rows[cut]] == [0, 1, 2]
    assert [_untimed(r) for r in rows[cut]] == [_untimed(r) for r in rows[short]]
    assert _untimed(summary) == _untimed(json.loads((short / "summary.json").read_text()))
    info = json.loads((cut / "sweep_run.json").read_text())
    assert info["experiment"] == "exp" and info["truncated_from"]["kept_rounds"] == 2
    assert "rounds: 2" in (cut / "config.yaml").read_text()


def _logged_run(tmp_path, planned, logged):
    """A run folder planning `planned` rounds whose metrics.jsonl has rounds 0..logged-1."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"name: exp\nmethod: local\nrounds: {planned}\n")
    rows = [{"round": r, "accuracy": 0.5, "seconds": 1.0, "bytes_down": 0, "bytes_up": 0,
             "accuracy_client_mean": 0.5} for r in range(logged)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_truncating_refuses_what_it_cannot_do_and_overwrites_nothing(tmp_path, capsys):
    run = _logged_run(tmp_path, planned=3, logged=3)  # round 3 never logged
    for rounds in (0, 3, 4):  # round 3 was planned but never logged
        with pytest.raises(ValueError, match=f"no round {rounds}"):
            truncate(run, tmp_path / "cut", rounds)
    assert not (tmp_path / "cut").exists()
    (tmp_path / "taken").mkdir()
    assert main([str(run), str(tmp_path / "taken"), "--rounds", "2"]) == 2
    assert "exists" in capsys.readouterr().err and not list((tmp_path / "taken").iterdir())
    assert main([str(run), str(tmp_path / "cut"), "--rounds", "2"]) == 0


def test_a_cut_run_keeps_the_nodes_never_admitted_by_its_last_round(tmp_path):
    """metrics.jsonl does not record registration refusals: the summary's list is carried."""
    run = _logged_run(tmp_path, planned=4, logged=5)
    early = {"count": 3, "first_round": 1, "last_round": 4, "last_reason": "K=0", "key": "a"}
    late = {"count": 1, "first_round": 3, "last_round": 3, "last_reason": "K=0"}
    summary = {"unadmitted_nodes": {"7": early, "8": late}}
    (run / "summary.json").write_text(json.dumps(summary))
    assert truncate(run, tmp_path / "cut2", 2)["unadmitted_nodes"] == {"7": early}
    (run / "summary.json").write_text(json.dumps({"unadmitted_nodes": {"8": late}}))
    assert "unadmitted_nodes" not in truncate(run, tmp_path / "cut1", 2)
