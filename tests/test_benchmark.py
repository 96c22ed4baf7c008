"""The benchmark script: real (tiny) runs in child processes, JSON and Markdown out."""

from __future__ import annotations

import json

import pytest

from experiments import benchmark


@pytest.mark.slow
def test_benchmark_runs_both_engines_repeated_and_reports_medians(mnist_npz, tmp_path):
    out = tmp_path / "bench"
    argv = ["--data", f"npz:{mnist_npz}", "--cases", "lenet", "--clients", "2", "--rounds", "1"]
    argv += ["--epochs", "1", "--repeats", "2", "--threads", "1", "--out", str(out)]
    argv += ["--set", "data.fraction=0.02", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert benchmark.main(argv) == 0

    report = json.loads((out / "benchmark.json").read_text())
    rows = {r["engine"]: r for r in report["rows"]}
    assert set(rows) == {"loop", "batched"}
    for row in rows.values():
        assert "error" not in row
        assert len(row["repeats"]) == 2
        spread = [r["seconds_per_round"] for r in row["repeats"]]
        assert min(spread) <= row["seconds_per_round"] <= max(spread)
        assert row["peak_rss_mb"] > 100  # a child with torch loaded, measured by wait4
        assert row["server_seconds_per_client_update"] > 0
        # the same models on the same data in a bare PyTorch loop: the torch limit
        assert 0 < row["client_samples_per_second"] < 1.5 * row["bare_torch_samples_per_second"]
    # the same seeded run: both engines and every repeat reach the same accuracy
    assert rows["loop"]["final_accuracy"] == rows["batched"]["final_accuracy"]
    table = (out / "benchmark.md").read_text()
    assert table.count("| lenet |") == 2 and "1.00x" in table and "bare PyTorch" in table


def test_repeats_that_disagree_are_reported_not_averaged():
    runs = [
        {"seconds_per_round": s, "final_accuracy": a, "round_seconds": [s]}
        for s, a in ((1.0, 0.5), (3.0, 0.5), (2.0, 0.6))
    ]
    row = benchmark.aggregate(runs)
    assert row["seconds_per_round"] == pytest.approx(2.0)
    assert "different accuracies" in row["error"]
    assert "failed" in benchmark.markdown(
        [{"case": "c", "engine": "e", "device": "d", "threads": 1, **row}]
    )


def test_a_failed_repeat_fails_the_row():
    ok = {"seconds_per_round": 1.0, "final_accuracy": 0.5, "round_seconds": [1.0]}
    assert benchmark.aggregate([ok, {"error": "exit status 1"}]) == {"error": "exit status 1"}


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--cases", "lenet,fiv"], "unknown ['fiv']"),
        (["--threads", "0"], "--threads '0'"),
        (["--engines", "loop,gpu"], "loop and/or batched"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_child_runs(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
