"""Honest model selection: a validation split held out of each client's training data,
evaluated beside the test split in the same exchange, and the round it selects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client_app.data import client_indices
from common.config import DataConfig, resolve_config
from common.datasets import load_dataset
from common.partition import split_validation
from server_app.round_log import run_summary, select_by_validation


@pytest.mark.parametrize("partitioner", ["noniid1", "noniid2", "iid"])
def test_validation_split_is_disjoint_seeded_and_carved_from_train(mnist_npz, partitioner):
    raw = load_dataset(f"npz:{mnist_npz}")
    data = DataConfig(source=f"npz:{mnist_npz}", fraction=0.1, partitioner=partitioner,
                      val_fraction=0.2)  # fmt: skip
    no_val = data.model_copy(update={"val_fraction": 0.0})
    for client in range(4):
        train, val, test = client_indices(data, raw.labels, raw.name, client, 4, seed=3)
        assert len(val) == int(0.2 * (len(train) + len(val))) > 0
        assert not set(train) & set(val) and not set(val) & set(test)
        assert not set(train) & set(test)
        # the held-out part comes out of the training data; test is untouched
        full_train, none, same_test = client_indices(no_val, raw.labels, raw.name, client, 4, 3)
        assert len(none) == 0 and np.array_equal(same_test, test)
        assert set(train) | set(val) == set(full_train)
        again = client_indices(data, raw.labels, raw.name, client, 4, seed=3)
        assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
        other = client_indices(data, raw.labels, raw.name, client, 4, seed=4)
        assert not np.array_equal(other[1], val)


def test_no_validation_keeps_the_training_indices_in_order():
    indices = np.array([9, 3, 7, 1])
    train, val = split_validation(indices, 0.0, seed=1)
    assert np.array_equal(train, indices) and val.size == 0
    train, val = split_validation(np.arange(10), 0.3, seed=1)
    assert len(val) == 3 and sorted([*train, *val]) == list(range(10))
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(indices, 1.0, seed=1)


def test_val_fraction_is_validated_with_its_key():
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        resolve_config("default", {"data.val_fraction": 1.5})


def test_selection_picks_the_round_of_best_validation_not_best_test():
    history = [
        {"round": 0, "accuracy": 0.10, "val_accuracy": 0.11},
        {"round": 1, "accuracy": 0.60, "val_accuracy": 0.70},
        {"round": 2, "accuracy": 0.75, "val_accuracy": 0.65},  # best test, worse validation
        {"round": 3, "accuracy": 0.55, "val_accuracy": 0.70},  # ties round 1: the earlier wins
        {"round": 4, "accuracy": None},  # not evaluated
    ]
    assert select_by_validation(history)["round"] == 1
    summary = run_summary([{**r, "seconds": 1.0, "bytes_down": 0, "bytes_up": 0,
                            "accuracy_client_mean": r["accuracy"]} for r in history])  # fmt: skip
    assert (summary["best_round"], summary["selected_round"]) == (2, 1)
    assert summary["selected_accuracy"] == 0.60
    assert select_by_validation([{"round": 1, "accuracy": 0.5}]) is None


def test_rounds_of_equal_validation_accuracy_are_told_apart_by_validation_loss():
    history = [
        {"round": 1, "accuracy": 0.60, "val_accuracy": 0.70, "val_loss": 0.90},
        {"round": 2, "accuracy": 0.58, "val_accuracy": 0.70, "val_loss": 0.80},  # lowest loss
        {"round": 3, "accuracy": 0.62, "val_accuracy": 0.70, "val_loss": 0.80},  # same: later
        {"round": 4, "accuracy": 0.65, "val_accuracy": 0.70, "val_loss": None},  # no loss
        {"round": 5, "accuracy": 0.90, "val_accuracy": 0.69, "val_loss": 0.10},  # lower accuracy
    ]
    assert select_by_validation(history)["round"] == 2
    assert select_by_validation(history[3:])["round"] == 4
    assert select_by_validation([history[3], history[0]])["round"] == 1
    nan_loss = {**history[0], "round": 0, "val_loss": float("nan")}
    assert select_by_validation([nan_loss, history[0]])["round"] == 1
    assert select_by_validation([history[0], nan_loss])["round"] == 1


@pytest.mark.slow
def test_a_run_reports_validation_accuracy_and_the_round_it_selects(mnist_npz, tmp_path):
    """Both splits are evaluated in the same exchanges: no extra round trip per round."""
    from simulation.run import run_inprocess

    overrides = {"rounds": 3, "data.source": f"npz:{mnist_npz}", "data.fraction": 0.05,
                 "data.num_clients": 3, "data.val_fraction": 0.2, "server.min_nodes": 1,
                 "server.output_root": str(tmp_path), "server.checkpoint_every": 0,
                 "data.cache_partitions": False,
                 "hypernetwork.schedule": "parallel_mean"}  # fmt: skip
    strategy = run_inprocess(resolve_config("default", overrides), overrides)
    rows = strategy.history
    assert all(0 <= r["val_accuracy"] <= 1 for r in rows)
    assert rows[-1]["val_accuracy"] > rows[0]["val_accuracy"]
    same = {**overrides, "data.val_fraction": 0.0, "server.output_root": str(tmp_path / "b")}
    plain = run_inprocess(resolve_config("default", same), same).history
    assert [r["exchanges"] for r in rows] == [r["exchanges"] for r in plain]
    assert all("val_accuracy" not in r for r in plain)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "b"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selected_round"] == select_by_validation(rows)["round"]


def test_report_shows_the_validation_selected_accuracy_beside_the_others(tmp_path):
    from experiments.report import load_runs, write_report

    for seed, (accs, vals) in enumerate((([0.1, 0.8, 0.6], [0.1, 0.5, 0.7]),
                                         ([0.1, 0.5, 0.9], [0.1, 0.6, 0.4]))):  # fmt: skip
        run = tmp_path / f"r{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(f"name: exp\nmethod: local\nseed: {seed}\n")
        rows = [{"round": i, "accuracy": a, "val_accuracy": v, "seconds": 1.0}
                for i, (a, v) in enumerate(zip(accs, vals, strict=True))]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"rounds": 2, "total_bytes_down": 0,
                                                      "total_bytes_up": 0}))  # fmt: skip
    write_report(tmp_path)
    runs, _ = load_runs(tmp_path)
    assert [(r.selected_round, r.selected_accuracy) for r in runs] == [(2, 0.6), (1, 0.5)]
    text = (tmp_path / "results.md").read_text()
    assert "val-selected acc (%)" in text and "| 55.00 ± 7.07 |" in text


def test_a_round_logged_twice_counts_once_with_its_last_row(tmp_path):
    """An older version's resume appended the replayed rounds: the discarded first copy of
    round 2 must neither be selected on validation nor counted in the seconds per round."""
    from experiments.report import load_run

    run = tmp_path / "r0"
    run.mkdir()
    (run / "config.yaml").write_text("name: exp\nmethod: local\nseed: 0\n")
    rows = [(0, 0.1, 0.1, 1.0), (1, 0.5, 0.5, 1.0), (2, 0.9, 0.9, 7.0),  # lost in a crash
            (2, 0.6, 0.6, 1.0), (3, 0.7, 0.7, 1.0)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "accuracy": a, "val_accuracy": v, "seconds": s}) + "\n"
        for r, a, v, s in rows))  # fmt: skip
    (run / "summary.json").write_text(json.dumps({"rounds": 3, "total_bytes_down": 0,
                                                  "total_bytes_up": 0}))  # fmt: skip
    result = load_run(run)
    assert (result.selected_round, result.selected_accuracy) == (3, 0.7)
    assert result.seconds_per_round == 1.0 and result.largest_drop == 0.0
    (run / "summary.json").unlink()  # unfinished: its figures so far
    so_far = load_run(run).so_far
    assert (so_far.best_round, so_far.best_accuracy, so_far.total_seconds) == (3, 0.7, 4.0)


def test_the_report_gives_each_architectures_accuracy_in_runs_of_several_models(tmp_path):
    from experiments.report import architecture_accuracy, write_report

    row = {"client_accuracy": {"partition-0": 0.9, "partition-1": 0.5, "partition-2": 0.7,
                               "partition-3": 0.3, "site-a": 0.0}}  # fmt: skip
    assert architecture_accuracy(row, ["lenet", "mlp"]) == pytest.approx({"lenet": 0.8, "mlp": 0.4})
    assert architecture_accuracy(row, ["lenet"]) == {}
    run = tmp_path / "r0"
    run.mkdir()
    (run / "config.yaml").write_text("name: het\nmethod: local\nseed: 0\n"
                                     "clients: {models: [lenet, mlp]}\n")  # fmt: skip
    rows = [{"round": 0, "accuracy": 0.1, "seconds": 1.0, "client_accuracy": {}},
            {"round": 1, "accuracy": 0.6, "seconds": 1.0, **row}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"rounds": 1, "total_bytes_down": 0,
                                                  "total_bytes_up": 0}))  # fmt: skip
    write_report(tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| run | lenet | mlp |" in text and "| r0 | 80.00 | 40.00 |" in text
