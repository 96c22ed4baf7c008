"""The paper's Table 7 beside a folder's runs, and its orderings checked seed by seed."""

from __future__ import annotations

import csv
import json
import math

import pytest

from experiments.orderings import compare
from experiments.paper_table7 import column_of, paper_accuracy

CIFAR10 = {"source": "imagefolder:../shared/data/cifar10", "partitioner": "noniid2",
           "num_clients": 10}  # fmt: skip


def test_the_paper_figure_is_found_only_for_the_setting_it_was_measured_in():
    config = {"data": CIFAR10, "clients": {"models": ["lenet"]}}
    assert column_of(config) == ("homogeneous", "noniid2", 10)
    assert paper_accuracy(config, "fedgh") == pytest.approx(0.8419)  # Table 7, row FedGH
    five = ["lenet", "vgg8", "resnet10", "resnet12", "resnet18"]
    assert paper_accuracy({**config, "clients": {"models": five}}, "pfedlhn") == pytest.approx(
        0.8379
    )
    for other in (
        {"data": {**CIFAR10, "source": "cifar100"}},  # another dataset
        {"data": {**CIFAR10, "num_clients": 20}},  # no such column
        {"data": {**CIFAR10, "fraction": 0.1}},  # a part of the data
        {"clients": {"models": ["lenet", "mlp"]}},  # another model set
    ):
        assert math.isnan(paper_accuracy({**config, **other}, "local"))
    assert math.isnan(paper_accuracy(config, "my_new_method"))


def _write_run(folder, method, seed, curve, val):
    run = folder / f"{method}-s{seed}"
    run.mkdir()
    config = {
        "name": "t7",
        "method": method,
        "seed": seed,
        "rounds": len(curve) - 1,
        "data": {**CIFAR10, "partitioner": "noniid1"},
        "clients": {"models": ["lenet"]},
    }
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    rows = [{"round": r, "accuracy": a, "val_accuracy": v, "seconds": 1.0}
            for r, (a, v) in enumerate(zip(curve, val, strict=True))]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"rounds": len(curve) - 1, "final_accuracy": curve[-1],
               "final_round": len(curve) - 1, "best_accuracy": max(curve),
               "best_round": curve.index(max(curve)), "total_bytes_down": 0,
               "total_bytes_up": 0}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))


def test_orderings_are_paired_by_seed_and_say_plainly_whether_they_hold(tmp_path):
    """Paper non-IID_1: MH-pFedHN 94.24 > Local 92.71 > FedAvg 50.15. Local's seed 2 is missing,
    so only seeds 0 and 1 pair; the differences are checked against a hand computation."""
    from experiments.report import write_report

    curves = {  # seed -> method -> (test curve, validation curve); rounds 0-3
        0: {"mh_pfedhn": ([0.1, 0.80, 0.90, 0.86], [0.1, 0.7, 0.8, 0.9]),
            "local": ([0.1, 0.85, 0.88, 0.87], [0.1, 0.9, 0.8, 0.7]),
            "fedavg": ([0.1, 0.40, 0.50, 0.45], [0.1, 0.5, 0.4, 0.3])},
        1: {"mh_pfedhn": ([0.1, 0.70, 0.80, 0.90], [0.1, 0.6, 0.9, 0.8]),
            "local": ([0.1, 0.84, 0.83, 0.85], [0.1, 0.7, 0.8, 0.9]),
            "fedavg": ([0.1, 0.30, 0.40, 0.50], [0.1, 0.3, 0.4, 0.5])},
        2: {"mh_pfedhn": ([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
            "fedavg": ([0.1, 0.2, 0.3, 0.35], [0.1, 0.2, 0.3, 0.4])},
    }  # fmt: skip
    for seed, methods in curves.items():
        for method, (curve, val) in methods.items():
            _write_run(tmp_path, method, seed, curve, val)
    found = write_report(tmp_path)
    by = {(c.higher, c.lower, c.measure): c for c in found["orderings"]}
    assert {(c.higher, c.lower) for c in found["orderings"]} == {
        ("mh_pfedhn", "local"), ("mh_pfedhn", "fedavg")}  # fmt: skip

    def at_best_val(curve, val):
        return curve[max(range(len(val)), key=lambda r: (val[r], -r))]

    vs_local = by["mh_pfedhn", "local", "final_accuracy"]
    assert vs_local.seeds == (0, 1)
    assert vs_local.differences == pytest.approx((-1.0, 5.0))  # 86-87, 90-85
    assert (vs_local.verdict, vs_local.held) == ("mixed", 1)
    assert vs_local.mean == pytest.approx(2.0) and vs_local.std == pytest.approx(math.sqrt(18))
    selected = by["mh_pfedhn", "local", "selected_accuracy"]
    expected = [100 * (at_best_val(*curves[s]["mh_pfedhn"]) - at_best_val(*curves[s]["local"]))
                for s in (0, 1)]  # fmt: skip
    assert selected.differences == pytest.approx(expected)  # 86-85, 80-85
    assert selected.verdict == "mixed"
    best = by["mh_pfedhn", "local", "best_accuracy"]
    assert best.differences == pytest.approx((2.0, 5.0)) and best.verdict == "holds"
    late = by["mh_pfedhn", "fedavg", "late_mean_accuracy"]  # rounds 3 of 3
    assert late.seeds == (0, 1, 2) and late.verdict == "holds" and late.held == 3
    assert late.paper_difference == pytest.approx(94.24 - 50.15)
    text = (tmp_path / "results.md").read_text()
    assert "| t7 | mh_pfedhn > local | +1.53 | 0 1 | -2.00 ± 4.24 mixed (1 of 2 seeds) |" in text
    assert "| t7 | mh_pfedhn | 3 | 3 |" in text and "| 94.24 |" in text  # the paper's figure
    with (tmp_path / "orderings.csv").open() as f:
        row = next(r for r in csv.DictReader(f)
                   if r["lower"] == "local" and r["measure"] == "final_accuracy")  # fmt: skip
    assert (row["seeds"], row["differences"], row["verdict"]) == ("0 1", "-1.0000 5.0000", "mixed")


PAPER_NONIID2 = {"mh_pfedhn": 0.8372, "mh_pfedhngd": 0.8292, "fedgh": 0.8419, "local": 0.8304}


def _result(method, seed, accuracy, rounds=3, experiment="x"):
    """A finished run whose four accuracies are all `accuracy` (paper: Table 7, non-IID_2)."""
    from experiments.report import RunResult

    nan = float("nan")
    return RunResult(
        f"{method}-s{seed}", experiment, method, seed, rounds, accuracy, rounds, accuracy, 3,
        accuracy, 3, accuracy, accuracy, 0.0, 0.0, nan, nan, nan, nan,
        paper_accuracy=PAPER_NONIID2.get(method, nan),
    )  # fmt: skip


def _verdicts(runs):
    comparisons, notes = compare(runs)
    final = [c for c in comparisons if c.measure == "final_accuracy"]
    return {(c.higher, c.lower): (c.verdict, c.differences) for c in final}, notes


def test_the_papers_own_order_is_followed_whichever_method_it_puts_first():
    """FedGH is above MH-pFedHN in the paper's non-IID_2 column, so their difference is taken
    FedGH minus MH-pFedHN; MH-pFedHN and MH-pFedHNGD are compared once."""
    runs = [_result("mh_pfedhn", s, a) for s, a in ((0, 0.80), (1, 0.81))]
    runs += [_result("fedgh", s, a) for s, a in ((0, 0.78), (1, 0.78))]
    runs += [_result("mh_pfedhngd", s, 0.80) for s in (0, 1)]
    runs += [_result("local", s, 0.80) for s in (0, 1)]
    verdicts, notes = _verdicts(runs)
    assert sorted(verdicts) == [("fedgh", "mh_pfedhn"), ("fedgh", "mh_pfedhngd"),
                                ("local", "mh_pfedhngd"), ("mh_pfedhn", "local"),
                                ("mh_pfedhn", "mh_pfedhngd")]  # fmt: skip
    assert verdicts["fedgh", "mh_pfedhn"][0] == "reversed"
    assert verdicts["fedgh", "mh_pfedhn"][1] == pytest.approx((-2.0, -3.0))
    assert verdicts["mh_pfedhn", "mh_pfedhngd"][0] == "mixed"  # level, then ahead
    assert verdicts["local", "mh_pfedhngd"] == ("level", (0.0, 0.0))
    assert notes == []


def test_one_seed_says_only_how_that_seed_went():
    verdicts, _ = _verdicts([_result("mh_pfedhn", 0, 0.80), _result("local", 0, 0.79)])
    assert verdicts["mh_pfedhn", "local"][0] == "as the paper"
    verdicts, _ = _verdicts([_result("mh_pfedhn", 0, 0.78), _result("local", 0, 0.79)])
    assert verdicts["mh_pfedhn", "local"][0] == "against the paper"
    from experiments.orderings import markdown

    section = markdown(*compare([_result("mh_pfedhn", 4, 0.78), _result("local", 4, 0.79)]))
    line = next(x for x in section if "> local" in x)
    assert "| -1.00 against the paper (seed 4 only) |" in line


def test_runs_that_cannot_be_paired_are_left_out_with_a_reason():
    repeated = [_result("mh_pfedhn", 0, 0.8), _result("mh_pfedhn", 0, 0.7),
                _result("local", 0, 0.8)]  # fmt: skip
    assert _verdicts(repeated) == ({}, ["x: mh_pfedhn left out (more than one run of seed 0)"])
    longer = [_result("mh_pfedhn", 0, 0.8, rounds=150), _result("local", 0, 0.8, rounds=80)]
    assert _verdicts(longer) == ({}, ["x: mh_pfedhn and local not paired (150 rounds against 80)"])
    outside = _result("local", 1, 0.8)
    outside.paper_accuracy = float("nan")  # e.g. a run on another partition, same name
    runs = [_result("mh_pfedhn", 0, 0.8), _result("local", 0, 0.8), outside]
    verdicts, notes = _verdicts(runs)
    assert verdicts == {} and notes == [
        "x: local left out (not every run is in a setting of the paper's Table 7)"]  # fmt: skip
    mine = [_result("mh_pfedhn", 0, 0.8), _result("my_method", 0, 0.9)]  # no paper figure
    assert _verdicts(mine) == ({}, [])


def test_no_orderings_without_the_papers_setting(tmp_path):
    from experiments.report import write_report

    run = tmp_path / "r0"
    run.mkdir()
    (run / "config.yaml").write_text("name: exp\nmethod: mh_pfedhn\nseed: 0\n")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "accuracy": 0.5}) + "\n")
    (run / "summary.json").write_text(json.dumps({"rounds": 0}))
    (tmp_path / "orderings.csv").write_text("an old table\n")
    assert write_report(tmp_path)["orderings"] == []
    assert not (tmp_path / "orderings.csv").exists()  # not left beside other runs
    text = (tmp_path / "results.md").read_text()
    assert "paired over seeds" not in text
    # says why: here the config names no data, models, partitioner or client count
    assert "Not compared: these runs are in no setting of the paper's Table 7 (" in text
    assert "data.num_clients is None, not one of 10, 50, 100" in text


def test_what_keeps_a_run_out_of_table_7_is_said_one_setting_at_a_time():
    from experiments.paper_table7 import mismatches

    config = {"data": CIFAR10, "clients": {"models": ["lenet"]}}
    assert mismatches(config) == []
    small = {**config, "data": {**CIFAR10, "fraction": 0.05, "num_clients": 4}}
    assert mismatches(small) == ["data.fraction is 0.05, not 1",
                                 "data.num_clients is 4, not one of 10, 50, 100"]  # fmt: skip


def _with_settings(run, **settings):
    run.settings = {"seed": run.seed, "method": run.method, "client.lr": 0.005,
                    "hypernetwork.lr": 0.01, "pfedla.hn_lr": 50.0, **settings}  # fmt: skip
    return run


def test_runs_of_different_settings_are_neither_averaged_silently_nor_paired():
    """A trial mixed lr-0.02 MH-pFedHN runs into a folder of lr-0.005 ones: the report paired
    them with Local as the paper's ordering, and nothing said that the row mixed settings."""
    from experiments.report import _mixed_rows, aggregate

    mixed = [
        _with_settings(_result("mh_pfedhn", 0, 0.8), **{"client.lr": 0.02}),
        _with_settings(_result("mh_pfedhn", 1, 0.8)),
        _with_settings(_result("local", 0, 0.8)),
        _with_settings(_result("local", 1, 0.8)),
    ]
    verdicts, notes = _verdicts(mixed)
    assert verdicts == {}
    assert notes == ["x: mh_pfedhn left out (its runs differ in settings: client.lr (0.02, 0.005))"]
    rows = aggregate(mixed)
    assert [r["settings_differ"] for r in rows] == ["", "client.lr (0.02, 0.005)"]
    assert "**x / mh_pfedhn mixes settings**: its runs differ in client.lr (0.02, 0.005)" in (
        "\n".join(_mixed_rows(rows))
    )
    # two methods in different shared settings: not paired; their own sections may differ
    apart = [_with_settings(_result("mh_pfedhn", s, 0.8), **{"client.lr": 0.02}) for s in (0, 1)]
    apart += [_with_settings(_result("local", s, 0.8), **{"pfedla.hn_lr": 5e-3}) for s in (0, 1)]
    verdicts, notes = _verdicts(apart)
    assert verdicts == {} and notes == [
        "x: mh_pfedhn and local not paired (their settings differ: client.lr (0.02, 0.005))"
    ]
    own = [_with_settings(_result("mh_pfedhn", s, 0.8), **{"pfedla.hn_lr": 5e-3}) for s in (0, 1)]
    own += [_with_settings(_result("local", s, 0.79)) for s in (0, 1)]
    assert _verdicts(own)[0]["mh_pfedhn", "local"][0] == "holds"
    # a key an older run's config.yaml lacks is not a difference
    old = _with_settings(_result("local", 2, 0.79))
    del old.settings["hypernetwork.lr"]
    assert (
        _verdicts(
            [*own, old, _with_settings(_result("mh_pfedhn", 2, 0.8), **{"pfedla.hn_lr": 5e-3})]
        )[1]
        == []
    )


def test_a_table_whose_rows_ran_for_different_lengths_says_so():
    from experiments.report import _mixed_rows, aggregate

    rows = aggregate([_result("local", s, 0.8, rounds=4) for s in (0, 1)]
                     + [_result("fedavg", s, 0.5, rounds=20) for s in (0, 1)])  # fmt: skip
    assert _mixed_rows(rows) == ["", "- **x: rows of different lengths** (4, 20 rounds): compare "
                                 "its rows with care."]  # fmt: skip
    one_row = aggregate([_result("local", 0, 0.8, rounds=20), _result("local", 1, 0.8, rounds=30)])
    assert _mixed_rows(one_row) == ["", "- **x / local mixes run lengths** (20-30 rounds): its "
                                    "mean and spread are not those of one length."]  # fmt: skip


def test_a_row_with_two_runs_of_one_seed_or_a_figure_missing_from_some_runs_says_so():
    """A copied rerun of seed 0 must not pass for a second seed, and a mean over two of three
    runs must not pass for a three-seed mean."""
    import dataclasses

    from experiments.report import _mixed_rows, aggregate

    rerun = [_result("local", 0, 0.85), _result("local", 0, 0.65), _result("local", 1, 0.8)]
    (row,) = aggregate(rerun)
    assert (row["seeds"], row["repeated_seeds"], row["partial_figures"]) == (3, "0", "")
    partial = [_result("local", s, 0.8) for s in (0, 1, 2)]
    partial[1].selected_accuracy = float("nan")  # a run without a validation split
    (other,) = aggregate(partial)
    assert other["partial_figures"] == "selected_accuracy"
    no_drop = [*partial[:2], dataclasses.replace(partial[2], mean_drop=float("nan"))]
    (row_2,) = aggregate(no_drop)  # every summarised figure is checked, not only accuracies
    assert row_2["partial_figures"] == "selected_accuracy mean_drop"
    assert _mixed_rows([row]) == [
        "",
        "- **x / local has more than one run of seed 0**: they count as separate seeds in its "
        "mean and spread.",
    ]
    assert _mixed_rows([other]) == [
        "",
        "- **x / local: selected_accuracy missing from some runs**: those means and spreads are "
        "over fewer runs than its seeds.",
    ]
    assert _mixed_rows(aggregate([_result("local", s, 0.8) for s in (0, 1)])) == []


def test_a_table_whose_rows_average_different_seeds_says_so():
    """A three-seed mean beside a one-seed figure compares the seeds' partitions too."""
    from experiments.report import _mixed_rows, aggregate

    runs = [_result("local", s, 0.8) for s in (0, 1, 2)] + [_result("fedgh", 0, 0.7)]
    runs += [_result("pfedhn", s, 0.8) for s in (0, 1, 2)]
    assert _mixed_rows(aggregate(runs)) == [
        "",
        "- **x: rows over different seeds** (fedgh: 0; local, pfedhn: 0 1 2): a seed draws the "
        "partition, so rows over other seeds differ by more than their methods; the orderings "
        "pair methods seed by seed.",
    ]


def test_the_reason_for_no_orderings_is_given_only_when_every_run_of_ours_is_outside():
    from experiments.report import _no_orderings

    inside, outside = _result("mh_pfedhn", 0, 0.8), _result("mh_pfedhn", 0, 0.8, experiment="y")
    outside.outside_table7 = ("data.fraction is 0.05, not 1",)
    assert _no_orderings([inside, outside]) == []
    assert "(data.fraction is 0.05, not 1)" in _no_orderings([outside])[-1]


def test_curves_are_drawn_over_the_seeds_every_method_finished():
    """A mean over seeds 0-2 beside seed 0 alone compares partitions, not methods (the
    committed picture did so while seeds 1-2 ran): the plot keeps the shared seeds, says so."""
    from experiments.report import comparable

    lines = {"local": [_result("local", s, 0.9) for s in (0, 1, 2)],
             "fedgh": [_result("fedgh", 0, 0.9)]}  # fmt: skip
    kept, said = comparable(lines)
    assert [m.seed for m in kept["local"]] == [0] and said == "seed 0, those every method finished"
    both = {"local": lines["local"], "fedgh": [_result("fedgh", s, 0.9) for s in (0, 1, 2)]}
    assert comparable(both)[1] == "seeds 0, 1, 2"
    apart = {"local": [_result("local", 1, 0.9)], "fedgh": [_result("fedgh", 0, 0.9)]}
    assert comparable(apart) == (apart, "the methods' seeds differ")
