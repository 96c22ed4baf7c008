"""The experiment runner: sweep files, both runtimes, the results table and plots."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from common.config import run_config_toml
from experiments import runner
from experiments.report import BEST_LABEL, write_report
from experiments.sweep import SweepError, auto_tag, load_sweep, parse_sweep
from server_app.outputs import read_metrics
from tests.tiny_runs import tiny_data

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "sweeps" / "smoke.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMING = {"seconds", "server_update_seconds", "server_seconds_per_client_update"}
TIMING |= {"global_update_seconds", "exchange_seconds", "client_seconds"}


def _write_sweep(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _offline(sweep: dict, mnist_npz: Path, tmp_path: Path, **overrides) -> dict:
    """A sweep pointed at the offline MNIST copy, with a private data cache."""
    sweep = dict(sweep)
    sweep["overrides"] = {
        **sweep.get("overrides", {}),
        "data.source": f"npz:{mnist_npz}",
        "data.cache_dir": str(tmp_path / "cache"),
        **overrides,
    }
    return sweep


def _untimed_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics rows without the wall-clock fields (the rest must agree exactly)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ smoke sweep
def test_smoke_sweep_in_process_writes_table_and_plot(mnist_npz, tmp_path):
    """CI acceptance: 2 methods x 2 seeds x 2 rounds, in-process, table and plot."""
    shipped = yaml.safe_load(SMOKE.read_text())
    assert shipped["methods"] == ["mh_pfedhn", "mh_pfedhngd"] and shipped["seeds"] == [0, 1]
    assert shipped["overrides"]["rounds"] == 2
    sweep = _write_sweep(tmp_path / "smoke.yaml", _offline(shipped, mnist_npz, tmp_path))
    out = tmp_path / "out"

    outcomes = runner.run_sweep(sweep, out, progress=False)

    assert [o.status for o in outcomes] == ["ok"] * 4, outcomes
    names = sorted(o.run for o in outcomes)
    assert names == sorted(f"default-{m}-s{s}" for m in shipped["methods"] for s in (0, 1))
    status = json.loads((out / "sweep_status.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["ok"] * 4

    table = _read_csv(out / "results.csv")
    assert [(r["experiment"], r["method"]) for r in table] == [
        ("default", "mh_pfedhn"),
        ("default", "mh_pfedhngd"),
    ]
    for row in table:
        summaries = [
            json.loads((out / f"default-{row['method']}-s{s}" / "summary.json").read_text())
            for s in (0, 1)
        ]
        final = [s["final_accuracy"] for s in summaries]
        best = [s["best_accuracy"] for s in summaries]
        for s in (0, 1):  # every run plots its own curve when it ends
            assert (out / f"default-{row['method']}-s{s}" / "accuracy.png").stat().st_size > 1000
        assert row["seeds"] == "2" and row["seed_list"] == "0 1" and row["rounds"] == "2"
        assert float(row["final_accuracy_mean"]) == pytest.approx(statistics.fmean(final))
        assert float(row["final_accuracy_std"]) == pytest.approx(statistics.stdev(final))
        assert float(row["best_accuracy_mean"]) == pytest.approx(statistics.fmean(best))
        assert row["best_selected_by"] == BEST_LABEL
        down = statistics.fmean(s["total_bytes_down"] for s in summaries) / 1e6
        assert float(row["mb_down_mean"]) == pytest.approx(down)
        assert float(row["total_seconds_mean"]) == pytest.approx(
            statistics.fmean(s["total_seconds"] for s in summaries)
        )
        rows = read_metrics(out / f"default-{row['method']}-s0" / "metrics.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert float(row["seconds_per_round_mean"]) > 0
    assert float(table[1]["mb_down_mean"]) > float(table[0]["mb_down_mean"])  # + global model

    runs = _read_csv(out / "runs.csv")
    assert sorted(r["run"] for r in runs) == names

    md = (out / "results.md").read_text()
    assert BEST_LABEL in md
    for row in table:
        mean, std = (100 * float(row[f"final_accuracy_{s}"]) for s in ("mean", "std"))
        assert f"| default | {row['method']} | 2 | 2 | {mean:.2f} ± {std:.2f} |" in md
    for name in ("accuracy.png", "accuracy-default.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5000

    # Running it again skips the finished runs and rewrites the same table.
    before = (out / "results.csv").read_text()
    assert runner.main([str(sweep), "--out", str(out)]) == 0
    assert (out / "results.csv").read_text() == before
    status = json.loads((out / "sweep_status.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["skipped"] * 4


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tiny_npz, tmp_path, monkeypatch):
    sweep = {
        "methods": ["mh_pfedhn"],
        "experiments": ["default"],
        "seeds": [0, 1],
        "overrides": {
            "data.source": f"npz:{tiny_npz}",
            "data.cache_dir": str(tmp_path / "cache"),
            "data.num_clients": 2,
            "data.partitioner": "iid",
            "clients.models": "mlp",
            "rounds": 1,
            "server.checkpoint_every": 0,
        },
    }
    path = _write_sweep(tmp_path / "sweep.yaml", sweep)
    original = runner.run_inprocess

    def flaky(cfg, run_config, **kwargs):
        if cfg.seed == 0:
            raise RuntimeError("boom")
        original(cfg, run_config, **kwargs)

    monkeypatch.setattr(runner, "run_inprocess", flaky)
    assert runner.main([str(path), "--out", str(tmp_path / "out")]) == 1
    status = json.loads((tmp_path / "out" / "sweep_status.json").read_text())
    assert [(r["run"], r["status"]) for r in status["runs"]] == [
        ("default-mh_pfedhn-s0", "failed"),
        ("default-mh_pfedhn-s1", "ok"),
    ]
    assert "RuntimeError: boom" in status["runs"][0]["error"]
    assert "boom" in (tmp_path / "out" / "default-mh_pfedhn-s0" / "error.txt").read_text()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Runs without results" in md and "default-mh_pfedhn-s0" in md
    assert len(_read_csv(tmp_path / "out" / "results.csv")) == 1


def _run_with_a_plug_in_client(tiny_npz, tmp_path, monkeypatch, source: str, model: str) -> str:
    """A one-round sweep of two clients, the second running `model` from a module written
    from `source`: the runner's exit status must be 1; returns the run's error."""
    (tmp_path / f"{model.split(':')[0]}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = {
        "methods": ["mh_pfedhn"],
        "experiments": ["default"],
        "seeds": [0],
        "overrides": {
            "data.source": f"npz:{tiny_npz}",
            "data.cache_dir": str(tmp_path / "cache"),
            "data.num_clients": 2,
            "data.partitioner": "iid",
            "clients.models": ["mlp", model],
            "rounds": 1,
            "server.checkpoint_every": 0,
        },
    }
    path = _write_sweep(tmp_path / "sweep.yaml", sweep)
    assert runner.main([str(path), "--out", str(tmp_path / "out")]) == 1
    status = json.loads((tmp_path / "out" / "sweep_status.json").read_text())
    assert status["runs"][0]["status"] == "failed"
    return status["runs"][0]["error"]


def test_a_simulated_client_refused_at_registration_fails_its_run(tiny_npz, tmp_path, monkeypatch):
    """A sweep's clients are its own: one refused (here a plug-in model with five outputs for
    four classes) is a mistake to report, not a client to leave out of the numbers."""
    source = (
        "from torch import nn\n"
        "def five(in_channels):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(5))\n"
    )
    error = _run_with_a_plug_in_client(
        tiny_npz, tmp_path, monkeypatch, source, "narrow_models:five"
    )
    assert "1 client(s) admitted, server.min_clients=2" in error, error
    assert "not (2, 4): one logit per class" in error, error


def test_a_simulated_client_whose_code_raises_in_training_fails_its_run(
    tiny_npz, tmp_path, monkeypatch
):
    """The model passes the check at registration (it raises only in training mode): the
    run stops at the first such reply, naming the client and what it raised."""
    source = (
        "from torch import nn\n"
        "class Fragile(nn.Module):\n"
        "    def __init__(self, in_channels, num_classes):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "    def forward(self, x):\n"
        "        if self.training:\n"
        "            raise RuntimeError('fragile in training')\n"
        "        return self.body(x)\n"
        "def fragile(in_channels, num_classes):\n"
        "    return Fragile(in_channels, num_classes)\n"
    )
    model = "fragile_models:fragile"
    error = _run_with_a_plug_in_client(tiny_npz, tmp_path, monkeypatch, source, model)
    assert "round 1: client partition-1" in error and "fragile in training" in error, error


# --------------------------------------------------- interrupted sweeps continue
def test_a_sweep_started_again_continues_unfinished_runs_bit_for_bit(tiny_npz, tmp_path):
    """Every run is killed in round 4 (its checkpoint is round 2's, every 2 rounds); the sweep
    started again continues each from there, the clients' state (the Local baseline's own
    models, their secrets) restored as it was: the metrics are those of a sweep that was never
    stopped, to the last digit; a finished run is skipped."""
    from server_app.round_loop import RoundLoop

    sweep = {
        "methods": ["mh_pfedhn", "local"],
        "experiments": ["default"],
        "seeds": [0],
        "overrides": {
            **tiny_data(tiny_npz, tmp_path, 3),
            "clients.models": "lenet",
            "rounds": 5,
            "server.checkpoint_every": 2,
        },
    }
    path = _write_sweep(tmp_path / "sweep.yaml", sweep)
    assert [o.status for o in runner.run_sweep(path, tmp_path / "whole", progress=False)] == [
        "ok", "ok"
    ]  # fmt: skip

    original = RoundLoop.checkpoint

    def killed(self, server_round, num_rounds, pending):  # round 4 done and logged, not saved
        if server_round == 4:
            raise RuntimeError("killed")
        return original(self, server_round, num_rounds, pending)

    RoundLoop.checkpoint = killed
    try:
        outcomes = runner.run_sweep(path, tmp_path / "split", progress=False)
    finally:
        RoundLoop.checkpoint = original
    assert [o.status for o in outcomes] == ["failed", "failed"]
    outcomes = runner.run_sweep(path, tmp_path / "split", progress=False)
    assert [(o.status, o.resumed) for o in outcomes] == [("ok", True), ("ok", True)]
    for name in ("default-mh_pfedhn-s0", "default-local-s0"):
        whole, split = (_untimed_metrics(tmp_path / d / name) for d in ("whole", "split"))
        assert [r["round"] for r in split] == [0, 1, 2, 3, 4, 5]
        assert split == whole, name
    again = runner.run_sweep(path, tmp_path / "split", progress=False)
    assert [o.status for o in again] == ["skipped", "skipped"]


def test_dropped_checkpoints_free_the_disk_and_more_rounds_then_start_afresh(tiny_npz, tmp_path):
    sweep = {"methods": ["local"], "experiments": ["default"], "seeds": [0],
             "overrides": {**tiny_data(tiny_npz, tmp_path, 2), "clients.models": "mlp",
                           "rounds": 3, "server.checkpoint_every": 1}}  # fmt: skip
    path = _write_sweep(tmp_path / "sweep.yaml", sweep)
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"  # a first pass of 2 rounds each
    runner.run_sweep(path, kept, progress=False, settings={"rounds": 2})
    assert runner.main([str(path), "--out", str(dropped), "--set", "rounds=2",
                        "--drop-checkpoints"]) == 0  # fmt: skip
    run = "default-local-s0"
    assert (kept / run / "checkpoint.pt").is_file() and list(kept.glob(f"{run}/client_state.*"))
    assert not (dropped / run / "checkpoint.pt").exists()
    assert not list(dropped.glob(f"{run}/client_state.round*"))
    assert json.loads((dropped / run / "summary.json").read_text())["rounds"] == 2
    # to the file's 3 rounds: run again from round 0, so as a run made straight to 3 rounds
    assert [o.status for o in runner.run_sweep(path, dropped, progress=False)] == ["ok"]
    runner.run_sweep(path, tmp_path / "whole", progress=False)
    assert _untimed_metrics(dropped / run) == _untimed_metrics(tmp_path / "whole" / run)


def test_a_first_pass_with_fewer_rounds_is_extended_to_the_sweeps_rounds(
    tiny_npz, tmp_path, capsys
):
    """`--set rounds=2` runs every run to round 2 under its own name; the sweep started again
    without it continues them to the file's 4 rounds with the numbers of runs that never
    stopped (round 2's evaluation, a last round's, took an exchange of its own); an extension
    that fails leaves no summary of fewer rounds behind (the run is unfinished, not done). A
    setting that would change what a finished run computed is refused and changes nothing; a
    setting the runner owns or a key that does not exist is refused before anything runs."""
    from experiments.report import load_runs
    from server_app.round_loop import RoundLoop

    sweep = {
        "methods": ["mh_pfedhn", "local"],
        "experiments": ["default"],
        "seeds": [0],
        "overrides": {**tiny_data(tiny_npz, tmp_path, 3), "clients.models": "lenet",
                      "rounds": 4, "server.checkpoint_every": 2},
    }  # fmt: skip
    path = _write_sweep(tmp_path / "sweep.yaml", sweep)
    runner.run_sweep(path, tmp_path / "whole", progress=False)
    first = tmp_path / "passes"
    assert runner.main([str(path), "--out", str(first), "--set", "rounds=2"]) == 0
    for name in ("default-mh_pfedhn-s0", "default-local-s0"):
        assert [r["round"] for r in _untimed_metrics(first / name)] == [0, 1, 2]
        assert json.loads((first / name / "sweep_run.json").read_text())["overrides"]["rounds"] == 2
    settings = {"rounds": 2, "client.lr": 0.1}
    changed = runner.run_sweep(path, first, progress=False, settings=settings)
    assert [o.status for o in changed] == ["failed", "failed"]
    assert "client.lr: 0.005 -> 0.1" in changed[0].error and "--restart" in changed[0].error
    assert "client.lr" not in json.dumps(json.loads((first / name / "sweep_run.json").read_text()))

    original = RoundLoop.checkpoint

    def killed(self, server_round, num_rounds, pending):
        if server_round == 3:
            raise RuntimeError("killed")
        return original(self, server_round, num_rounds, pending)

    RoundLoop.checkpoint = killed
    try:
        assert [o.status for o in runner.run_sweep(path, first, progress=False)] == ["failed"] * 2
    finally:
        RoundLoop.checkpoint = original
    assert not (first / name / "summary.json").exists()
    done, unfinished = load_runs(first)
    assert done == [] and {item.run for item in unfinished} == {"default-mh_pfedhn-s0",
                                                                "default-local-s0"}  # fmt: skip
    assert all(item.so_far.final_round >= 2 for item in unfinished)
    outcomes = runner.run_sweep(path, first, progress=False)
    assert [(o.status, o.resumed) for o in outcomes] == [("ok", True), ("ok", True)]
    transport = {"exchanges", "bytes_down"}  # round 2 was a last round: evaluated on its own
    for name in ("default-mh_pfedhn-s0", "default-local-s0"):
        passes, whole = (
            [{k: v for k, v in r.items() if k not in transport} for r in _untimed_metrics(d)]
            for d in (first / name, tmp_path / "whole" / name)
        )
        assert passes == whole, name
        assert json.loads((first / name / "sweep_run.json").read_text())["overrides"]["rounds"] == 4
        assert "rounds: 4" in (first / name / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        runner.main([str(path), "--out", str(tmp_path / "bad"), "--set", "rounds"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
    for bad, message in ({"seed": 3}, "cannot be overridden"), ({"client.lrr": 0.1}, "lrr"):
        with pytest.raises(SweepError, match=f"--set: .*{message}"):
            runner.run_sweep(path, tmp_path / "bad", progress=False, settings=bad)
    assert not (tmp_path / "bad").exists()


def test_a_methods_own_setting_given_to_a_sweep_is_checked_once_and_warned_of_if_unused(
    tmp_path, caplog
):
    """`--set fedprox.mu=-1` is refused as itself (not as the problem of some run that is not
    FedProx, with every override listed); a valid one that no run reads is warned of."""
    smoke = load_sweep(ROOT / "configs" / "sweeps" / "smoke.yaml")  # MH-pFedHN and -GD only
    with pytest.raises(SweepError) as err:
        runner.planned(smoke, tmp_path, {"fedprox.mu": -1})
    assert str(err.value) == "--set: fedprox.mu=-1: Input should be greater than or equal to 0"
    with caplog.at_level("WARNING", logger=runner.log.name):
        runner.planned(smoke, tmp_path, {"fedprox.mu": 0.3, "global_model.temperature": 2.0})
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("--set fedprox.mu: no run"), warned


def test_a_report_is_titled_by_its_sweep_and_by_its_folder_when_they_differ(tmp_path):
    from experiments.report import title_of

    folder = tmp_path / "my-try"
    folder.mkdir()
    assert title_of(folder) == "my-try"  # no status: the folder
    status = {"sweep": "smoke", "runs": [{"run": "a", "sweep": "smoke"}]}
    (folder / "sweep_status.json").write_text(json.dumps(status))
    assert title_of(folder) == "smoke (folder my-try)"
    status["runs"].append({"run": "b", "sweep": "other"})  # two sweeps made it
    (folder / "sweep_status.json").write_text(json.dumps(status))
    assert title_of(folder) == "my-try"
    (folder / "sweep_status.json").write_text("{not json")
    assert title_of(folder) == "my-try"


# ------------------------------------------------------------ runs at once
def test_runs_at_once_give_the_numbers_of_runs_one_at_a_time(tiny_npz, tmp_path):
    """--workers 2: every run in a process of its own, the metrics those of the sweep run one
    at a time to the last digit; a run that fails (its data is missing) fails alone, with its
    reason in the status and its output in its log; finished runs are skipped."""
    sweep = {
        "methods": ["mh_pfedhn", "local"],
        "experiments": [
            "default",
            {"experiment": "default", "tag": "nodata",
             "overrides": {"data.source": f"npz:{tmp_path / 'missing.npz'}"}},
        ],
        "seeds": [0],
        "overrides": {**tiny_data(tiny_npz, tmp_path, 3), "clients.models": "mlp",
                      "rounds": 2, "server.checkpoint_every": 0},
    }  # fmt: skip
    path = _write_sweep(tmp_path / "sweep.yaml", sweep)
    good = "^default-(mh_pfedhn|local)-s0$"
    one = runner.run_sweep(path, tmp_path / "one", progress=False, only=good)
    assert [o.status for o in one] == ["ok", "ok"]
    assert runner.main([str(path), "--out", str(tmp_path / "two"), "--workers", "2"]) == 1
    status = json.loads((tmp_path / "two" / "sweep_status.json").read_text())
    assert [(r["run"], r["status"]) for r in status["runs"]] == [
        ("default-mh_pfedhn-s0", "ok"), ("default-local-s0", "ok"),
        ("default-nodata-mh_pfedhn-s0", "failed"), ("default-nodata-local-s0", "failed"),
    ]  # fmt: skip
    assert "missing.npz" in status["runs"][2]["error"]
    # a later invocation into the same folder (a subset, or another sweep) keeps the others;
    # an unreadable entry of an earlier file is dropped, not a crash
    text = (tmp_path / "two" / "sweep_status.json").read_text()
    (tmp_path / "two" / "sweep_status.json").write_text(
        text.replace('"runs": [', '"runs": [{"run": ["x"]}, 3, ', 1)
    )
    again = runner.run_sweep(path, tmp_path / "two", progress=False, only=good)
    assert [o.status for o in again] == ["skipped", "skipped"]
    status = json.loads((tmp_path / "two" / "sweep_status.json").read_text())
    assert [(r["run"], r["status"]) for r in status["runs"]] == [
        ("default-mh_pfedhn-s0", "skipped"), ("default-local-s0", "skipped"),
        ("default-nodata-mh_pfedhn-s0", "failed"), ("default-nodata-local-s0", "failed"),
    ]  # fmt: skip
    assert "missing.npz" in (tmp_path / "two" / "logs" / "default-nodata-local-s0.log").read_text()
    for name in ("default-mh_pfedhn-s0", "default-local-s0"):
        alone, beside = (_untimed_metrics(tmp_path / d / name) for d in ("one", "two"))
        assert [r["round"] for r in beside] == [0, 1, 2]
        assert beside == alone, name
    assert len(_read_csv(tmp_path / "two" / "results.csv")) == 2
    again = runner.run_sweep(path, tmp_path / "two", runtime=runner.Runtime(workers=2),
                             progress=False, only=good)  # fmt: skip
    assert [o.status for o in again] == ["skipped", "skipped"]


def test_workers_must_be_a_positive_number_and_run_in_process(tmp_path, capsys):
    with pytest.raises(SystemExit):
        runner.main([str(SMOKE), "--workers", "0"])
    assert "at least 1" in capsys.readouterr().err
    flower = runner.Runtime("flower", workers=2)
    with pytest.raises(SweepError, match="one at a time"):
        runner.run_sweep(SMOKE, tmp_path / "out", runtime=flower, progress=False)


# --------------------------------------------------------- engines agree exactly
@pytest.mark.slow
def test_flower_and_in_process_runtimes_give_identical_metrics(mnist_npz, tmp_path):
    """The same run through `flwr run` (Ray, 4 SuperNodes) and in-process: every metric
    except wall-clock times is exactly equal (ClientApps get the same torch thread count)."""
    sweep = {
        "methods": ["mh_pfedhn"],
        "experiments": ["default"],
        "seeds": [0],
        "overrides": {
            "rounds": 2,
            "data.fraction": 0.05,
            "data.num_clients": 4,
            "clients.models": ["lenet", "mlp"],
            "client.epochs": 1,
            "server.checkpoint_every": 0,
        },
    }
    path = _write_sweep(tmp_path / "sweep.yaml", _offline(sweep, mnist_npz, tmp_path))
    rows = {}
    for engine in ("flower", "inprocess"):
        out = tmp_path / engine
        outcomes = runner.run_sweep(path, out, runtime=engine, progress=False)
        log = out / "default-mh_pfedhn-s0" / runner.FLOWER_LOG
        assert [o.status for o in outcomes] == ["ok"], (
            outcomes,
            log.read_text()[-4000:] if log.is_file() else "",
        )
        rows[engine] = read_metrics(out / "default-mh_pfedhn-s0" / "metrics.jsonl")
    assert (tmp_path / "flower" / "default-mh_pfedhn-s0" / runner.FLOWER_LOG).is_file()
    flower, inprocess = (
        [{k: v for k, v in r.items() if k not in TIMING} for r in rows[e]]
        for e in ("flower", "inprocess")
    )
    assert [r["round"] for r in flower] == [0, 1, 2]
    assert flower[-1]["clients_trained"] == 4 and not flower[-1]["rejected"]
    for a, b in zip(flower, inprocess, strict=True):
        assert (a["accuracy"], a["loss"]) == (b["accuracy"], b["loss"]), a["round"]
        assert a == b


# ------------------------------------------------------------------- validation
def _valid() -> dict:
    return {"methods": ["mh_pfedhn"], "experiments": ["default"], "seeds": [0]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": ["mh_pfedhn"]}, "method: unknown key"),
        ({"methods": ["no_such_method"]}, "unknown method(s) ['no_such_method']"),
        ({"methods": []}, "methods: List should have at least 1 item"),
        ({"seeds": [0, 0]}, "a seed is listed twice"),
        ({"seeds": ["zero"]}, "seeds.0"),
        ({"experiments": ["nope"]}, "experiment 'nope' not found"),
        ({"experiments": [{"experiment": "default", "overide": {}}]}, "overide: unknown key"),
        ({"overrides": {"client.lrr": 0.1}}, "'client.lrr': did you mean 'client.lr'"),
        ({"overrides": {"seed": 3}}, "'seed' cannot be overridden in a sweep"),
        ({"overrides": {"server.run_name": "x"}}, "the runner names each run"),
        ({"experiments": ["default", "default"]}, "appear more than once"),
        ({"experiments": [{"experiment": "default", "tag": "a b"}]}, "tag"),
        (
            {"experiments": [{"experiment": "default", "methods": ["mh_pfdhn"]}]},
            "unknown method(s) ['mh_pfdhn']",
        ),
        (
            {
                "methods": None,
                "experiments": [
                    "default",
                    {"experiment": "default", "tag": "b", "methods": ["local"]},
                ],
            },
            "experiments ['default'] have no methods",
        ),
    ],
)
def test_invalid_sweeps_are_refused_with_a_clear_message(change, message):
    raw = {**_valid(), **change}
    if "method" in change:
        raw.pop("methods")
    with pytest.raises(SweepError) as err:
        parse_sweep(raw, "test")
    assert message in str(err.value)


def test_only_selects_the_same_runs_for_a_dry_run_and_refuses_a_filter_that_selects_none(
    tmp_path, capsys
):
    sweep = {**_valid(), "methods": ["mh_pfedhn", "local"], "seeds": [0, 1],
             "overrides": {"data.num_clients": 2}}  # fmt: skip
    path = _write_sweep(tmp_path / "s.yaml", sweep)
    out = tmp_path / "out"
    assert runner.main([str(path), "--out", str(out), "--dry-run", "--only", "local-s1"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and listed[0].startswith("default-local-s1: 2 clients")
    assert listed[0].endswith(", to run")
    for bad, said in (("lokal", "matches none of the sweep's 4 runs"), ("(", "not a regular")):
        assert runner.main([str(path), "--out", str(out), "--dry-run", "--only", bad]) == 2
        assert said in capsys.readouterr().err
        with pytest.raises(SweepError, match=re.escape(said)):
            runner.run_sweep(path, out, only=bad)
    assert not out.exists()  # nothing ran
    run = out / "default-local-s1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("client:\n  lr: 0.02\n")
    argv = [str(path), "--out", str(out), "--dry-run", "--only", "local-s1"]
    assert runner.main(argv) == 0
    assert "would be refused: its folder holds it made with other settings (client.lr: 0.02 ->" in (
        capsys.readouterr().out
    )
    assert runner.main([*argv, "--restart"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(", starts afresh (--restart)")
    (run / "config.yaml").unlink()  # an attempt that stopped before its first checkpoint
    assert runner.main(argv) == 0
    assert "starts afresh (its folder's earlier attempt is cleared)" in capsys.readouterr().out


def test_an_experiment_may_run_methods_of_its_own():
    """A variant of one method beside the sweep's methods, in one file."""
    sweep = parse_sweep({**_valid(), "methods": ["local", "mh_pfedhn"], "experiments": [
        "default", {"experiment": "default", "tag": "lr2", "overrides": {"client.lr": 0.02},
                    "methods": ["mh_pfedhn"]}]}, "t")  # fmt: skip
    assert [r.name for r in sweep.runs()] == [
        "default-local-s0", "default-mh_pfedhn-s0", "default-lr2-mh_pfedhn-s0"]  # fmt: skip


def test_runs_need_a_fixed_number_of_clients(tmp_path):
    path = _write_sweep(tmp_path / "s.yaml", _valid())  # default.yaml: num_clients auto
    assert runner.main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    with pytest.raises(SweepError, match="data.num_clients is 'auto'"):
        runner.run_sweep(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing ran
    bad = {**_valid(), "overrides": {"data.num_clients": 2, "client.lr": -1}}
    path = _write_sweep(tmp_path / "bad.yaml", bad)
    with pytest.raises(SweepError, match="client.lr"):
        runner.run_sweep(path, tmp_path / "out")


def test_sweep_expansion_names_and_overrides(tmp_path):
    experiment = tmp_path / "mine.yaml"
    experiment.write_text("extends: default\nname: mine\ndata:\n  num_clients: 3\n")
    raw = {
        "methods": ["mh_pfedhn", "mh_pfedhngd"],
        "experiments": [
            "default",
            {"experiment": "default", "overrides": {"data.partitioner": "noniid2"}},
            {"experiment": "default", "overrides": {"client.lr": 0.005}, "tag": "lr"},
            {"experiment": "mine.yaml"},  # relative to the sweep file
        ],
        "seeds": [1, 2],
        "overrides": {"rounds": 3, "clients.models": ["lenet", "mlp"], "client.lr": 0.01},
    }
    sweep = load_sweep(_write_sweep(tmp_path / "sweep.yaml", raw))
    assert sweep.name == "sweep"
    runs = sweep.runs()
    assert len(runs) == 4 * 2 * 2
    assert [r.name for r in runs[:4]] == [
        "default-mh_pfedhn-s1",
        "default-mh_pfedhngd-s1",
        "default-mh_pfedhn-s2",
        "default-mh_pfedhngd-s2",
    ]
    labels = sorted({r.label for r in runs})
    assert labels == ["default", "default-lr", "default-noniid2", "mine"]
    lr = next(r for r in runs if r.label == "default-lr")
    assert lr.overrides["client.lr"] == 0.005  # the entry's override wins
    assert lr.overrides["clients.models"] == "lenet,mlp"  # lists travel as Flower strings
    mine = next(r for r in runs if r.label == "mine")
    assert mine.experiment == str(experiment.resolve())
    cfg, run_config = mine.resolve(tmp_path / "out")
    assert cfg.name == "mine" and cfg.data.num_clients == 3 and cfg.server.min_nodes == 3
    assert run_config["server.run_name"] == "mine-mh_pfedhn-s1" and run_config["seed"] == 1
    assert run_config["server.output_root"] == str((tmp_path / "out").resolve())
    assert len({r.name for r in runs}) == len(runs)
    assert auto_tag({"a.b": "x" * 40}).startswith("v") and len(auto_tag({"a.b": "x" * 40})) == 9


def test_shipped_sweeps_are_valid():
    paths = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert {p.name for p in paths} >= {"smoke.yaml", "cifar10_cpu.yaml"}
    for path in paths:
        sweep = load_sweep(path)
        for run in sweep.runs():
            cfg, _ = run.resolve("outputs")
            assert isinstance(cfg.data.num_clients, int)
    cifar = load_sweep(ROOT / "configs" / "sweeps" / "cifar10_cpu.yaml")
    assert cifar.methods == ["mh_pfedhn", "mh_pfedhngd"] and cifar.seeds == [0, 1, 2]
    labels = {r.label for r in cifar.runs()}
    assert labels == {
        f"cifar10_{s}-{p}" for s in ("homogeneous", "heterogeneous") for p in ("noniid1", "noniid2")
    }


def test_run_config_travels_to_flower_as_toml(tmp_path):
    """What `flwr run --run-config FILE.toml` reads is the flat run config itself."""
    from flwr.common.config import parse_config_args

    config = {
        "experiment": "default",
        "data.source": 'npz:/a b/"q".npz',
        "data.fraction": 0.05,
        "client.lr": 1e-05,
        "rounds": 2,
        "data.download": False,
    }
    path = tmp_path / "run_config.toml"
    path.write_text(run_config_toml(config))
    assert parse_config_args([str(path)]) == config


def _finished_run(run, seed, accs):
    """A finished run's folder as the server writes it (config, metrics, summary)."""
    run.mkdir()
    (run / "config.yaml").write_text(f"name: exp\nmethod: mh_pfedhn\nseed: {seed}\n")
    rows = [
        {"round": i, "accuracy": a, "accuracy_client_mean": a, "seconds": 2.0 + i}
        for i, a in enumerate(accs)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "rounds": 2,
        "total_seconds": 9.0,
        "total_bytes_down": 2_000_000,
        "total_bytes_up": 1_000_000,
        "final_accuracy": accs[-1],
        "final_round": 2,
        "final_accuracy_client_mean": accs[-1],
        "best_accuracy": max(accs),
        "best_round": accs.index(max(accs)),
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_report_regenerates_from_a_folder(tmp_path, capsys):
    """`python -m experiments.report DIR` over runs it did not make (no sweep_run.json)."""
    for seed, accs in ((0, [0.1, 0.5, 0.4]), (1, [0.1, 0.3, 0.6])):
        _finished_run(tmp_path / f"r{seed}", seed, accs)
    from experiments.report import main

    assert main([str(tmp_path)]) == 0
    (row,) = _read_csv(tmp_path / "results.csv")
    assert (row["experiment"], row["method"], row["seeds"]) == ("exp", "mh_pfedhn", "2")
    assert float(row["final_accuracy_mean"]) == pytest.approx(0.5)
    assert float(row["best_accuracy_mean"]) == pytest.approx(0.55)
    assert float(row["late_mean_accuracy_mean"]) == pytest.approx(0.5)  # round 2 of 2
    assert float(row["seconds_per_round_mean"]) == pytest.approx(3.5)  # rounds 1 and 2
    assert float(row["mb_down_mean"]) == pytest.approx(2.0)
    assert (
        "| exp | mh_pfedhn | 2 | 2 | 50.00 ± 14.14 | 55.00 ± 7.07 |"
        in (tmp_path / "results.md").read_text()
    )
    assert write_report(tmp_path)["plots"][0].name == "accuracy.png"


def test_a_long_runs_plot_zooms_on_its_late_rounds(tmp_path):
    """Past 30 rounds the per-experiment plot gets a second panel on the late mean's rounds."""
    import matplotlib.image

    from experiments.report import RunResult, late_start, plot

    def run(rounds: int, experiment: str) -> RunResult:
        curve = {r: 0.9 - 0.01 * (r % 3) for r in range(rounds + 1)}
        nan = float("nan")
        return RunResult(
            f"{experiment}-s0", experiment, "mh_pfedhn", 0, rounds, 0.9, rounds, 0.9, 0,
            nan, -1, 0.9, 0.9, 0.0, 0.0, nan, nan, nan, nan, curve,
        )  # fmt: skip

    plot([run(150, "long"), run(8, "short")], tmp_path)
    width = {
        n: matplotlib.image.imread(tmp_path / f"accuracy-{n}.png").shape[1]
        for n in ("long", "short")
    }
    assert width["long"] == 2 * width["short"]
    assert late_start(150) == 101 and late_start(20) == 14


def test_a_sweep_of_variants_also_gets_every_variant_on_one_plot(tmp_path):
    """One method per experiment (e.g. the clients-in-flight sweeps): accuracy-variants.png;
    several methods per experiment (Table 7): no such plot."""
    from experiments.report import RunResult, plot

    def run(experiment: str, method: str = "mh_pfedhn") -> RunResult:
        nan = float("nan")
        return RunResult(
            f"{experiment}-{method}-s0", experiment, method, 0, 3, 0.9, 3, 0.9, 0,
            nan, -1, 0.9, 0.9, 0.0, 0.0, nan, nan, nan, nan, {r: 0.3 * r for r in range(4)},
        )  # fmt: skip

    for folder in ("variants", "t7"):
        (tmp_path / folder).mkdir()
    written = plot([run("c1"), run("c2")], tmp_path / "variants")
    assert tmp_path / "variants" / "accuracy-variants.png" in written
    table = plot([run("a"), run("a", "local"), run("b"), run("b", "local")], tmp_path / "t7")
    assert not any(p.name == "accuracy-variants.png" for p in table)


def test_report_over_a_folder_without_runs_writes_nothing(tmp_path, capsys):
    """A mistyped folder must not replace a committed table with an empty one."""
    from experiments.report import main

    (tmp_path / "results.md").write_text("the table\n")
    assert main([str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err
    assert (tmp_path / "results.md").read_text() == "the table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


@pytest.mark.parametrize("metrics", [None, '{"round": 0, "accuracy": 0.1}\n{"round": 1, "acc'])
def test_report_refuses_a_finished_run_whose_metrics_cannot_be_read(tmp_path, capsys, metrics):
    """A run with summary.json finished: without its rows its figures would silently be missing
    from the table, so the report names the file and line and writes nothing."""
    from experiments.report import main

    _finished_run(tmp_path / "r0", 0, [0.1, 0.5, 0.4])
    bad = _finished_run(tmp_path / "r1", 1, [0.1, 0.3, 0.6])
    (bad / "metrics.jsonl").unlink()
    if metrics is not None:
        (bad / "metrics.jsonl").write_text(metrics)
    sweep_run = {"experiment": "exp", "method": "mh_pfedhn", "seed": 1}  # marks a run folder
    (bad / "sweep_run.json").write_text(json.dumps(sweep_run))
    (tmp_path / "results.md").write_text("the table\n")
    assert main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(bad / "metrics.jsonl") in error and "nothing written" in error
    assert ("line 2:" in error) if metrics else ("cannot be read" in error)
    assert (tmp_path / "results.md").read_text() == "the table\n"
    assert not (tmp_path / "results.csv").exists()


def test_report_says_how_far_a_run_still_going_has_got(tmp_path):
    """A long run without summary.json is listed with its last evaluated round and its best so
    far, against the rounds its config plans, and its late mean once it is in the last third;
    one that never evaluated says only that. Its figures so far (val-selected, by architecture)
    get a table of their own, apart from the finished runs'."""
    from experiments.report import load_runs, write_report

    going, late, failed = tmp_path / "going", tmp_path / "late", tmp_path / "failed"
    for run, planned in ((going, 150), (late, 8), (failed, 150)):
        run.mkdir()
        (run / "config.yaml").write_text(f"name: exp\nmethod: mh_pfedhn\nrounds: {planned}\n"
                                         "clients:\n  models: [lenet, mlp]\n")  # fmt: skip
    accuracies = [0.1, 0.6, 0.8, 0.8, 0.7, 0.5, 0.6, 0.8]
    for run, count in ((going, 5), (late, len(accuracies))):
        rows = [
            {"round": i, "accuracy": a, "seconds": 2.0} for i, a in enumerate(accuracies[:count])
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [json.loads(line) for line in (going / "metrics.jsonl").read_text().splitlines()]
    for row, val in zip(rows, [0.1, 0.9, 0.6, 0.5, 0.7], strict=True):
        row["val_accuracy"] = val  # best on validation: round 1, test 0.6
    rows[-1]["client_accuracy"] = {"partition-0": 0.5, "partition-1": 0.9, "partition-2": 0.7}
    (going / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (failed / "metrics.jsonl").write_text("")
    odd = tmp_path / "odd"  # rows a crashed or foreign writer may leave: the report goes on
    odd.mkdir()
    lines = ['{"round": 0, "accuracy": NaN}', '{"round": 1, "accuracy": 0.4, "seconds": null}',
             '{"round": 2, "accuracy": 0.5, "bytes_down": null}']  # fmt: skip
    (odd / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 3, "accur')  # half written
    done, incomplete = load_runs(tmp_path)
    odd_figures = next(item.so_far for item in incomplete if item.run == "odd")
    assert (odd_figures.best_accuracy, odd_figures.best_round, odd_figures.rounds) == (0.5, 2, 2)
    assert math.isnan(odd_figures.seconds_per_round)
    incomplete = [item for item in incomplete if item.run != "odd"]
    reasons = {item.run: item.reason for item in incomplete}
    assert done == []
    assert reasons == {
        "failed": "no summary.json",
        "going": "no summary.json; evaluated up to round 4 of 150: 70.00% there, "
        "best so far 80.00% at round 2",
        "late": "no summary.json; evaluated up to round 7 of 8: 80.00% there, "
        "best so far 80.00% at round 2, mean of rounds 6-7 70.00%",
    }
    so_far = {item.run: item.so_far for item in incomplete}
    assert so_far["failed"] is None
    figures = so_far["going"]
    assert (figures.rounds, figures.final_round, figures.final_accuracy) == (150, 4, 0.7)
    assert (figures.best_round, figures.best_accuracy) == (2, 0.8)
    assert (figures.selected_round, figures.selected_accuracy) == (1, 0.6)
    assert figures.by_architecture == pytest.approx({"lenet": 0.6, "mlp": 0.9})
    assert figures.seconds_per_round == 2.0 and math.isnan(figures.late_mean_accuracy)
    assert so_far["late"].late_mean_accuracy == pytest.approx(0.7)
    write_report(tmp_path)
    md = (tmp_path / "results.md").read_text().split("## Runs")[-1]
    assert "their figures so far" in md
    assert "| going | 4 of 150 | 70.00 | 80.00 | 2 | 60.00 | 1 |" in md
    assert "| going | 60.00 | 90.00 |" in md  # lenet, mlp at round 4
    assert (tmp_path / "progress.png").read_bytes().startswith(PNG_SIGNATURE)
    for run in (going, late, odd):  # nothing left that is going: no progress plot, old one goes
        shutil.rmtree(run)
    write_report(tmp_path)
    assert not (tmp_path / "progress.png").exists()


def test_runtime_trains_as_many_clients_at_once_as_ray_would(monkeypatch):
    """cores / threads per client, at least 1; OMP_NUM_THREADS overrides the threads."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert runner.Runtime(cpus_per_client=1).parallel_clients() == 8
    assert runner.Runtime(cpus_per_client=3).parallel_clients() == 2
    assert runner.Runtime(cpus_per_client=16).parallel_clients() == 1
    assert runner.Runtime(cpus_per_client=1, workers=2).parallel_clients() == 4  # cores shared
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert runner.Runtime(cpus_per_client=1).parallel_clients() == 2


def test_the_late_window_zooms_on_the_leaders_and_names_the_line_left_below():
    """A method 40 points behind (FedAvg in Table 7) must not flatten the others' late rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.report import _zoom_on_the_leaders

    fig, ax = plt.subplots()
    shown = {"local": [91.0, 92.0], "mh_pfedhn": [90.0, 92.5], "fedavg": [50.0, 54.0]}
    assert _zoom_on_the_leaders(ax, shown) == "; below: fedavg"
    assert ax.get_ylim() == pytest.approx((89.5, 93.0))
    level = {"local": [91.0, 92.0], "pfedhn": [85.0, 86.0]}  # within 10 points: all shown
    fig2, ax2 = plt.subplots()
    before = ax2.get_ylim()
    assert _zoom_on_the_leaders(ax2, level) == "" and ax2.get_ylim() == before
    plt.close(fig)
    plt.close(fig2)
