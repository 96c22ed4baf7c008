"""Results table and accuracy plots for a folder of runs.

    python -m experiments.report outputs/sweeps/smoke

Reads every <DIR>/<run>/ that has metrics.jsonl (config.yaml, summary.json and the runner's
sweep_run.json beside it) and writes, in DIR:
- `results.csv`: one row per (experiment, method): mean and sample standard deviation over
  seeds of the final and the best pooled accuracy, the late mean (pooled accuracy averaged over
  the last third of the rounds), the final client-mean accuracy, the
  stability of the curve (mean and largest drop of pooled accuracy from one evaluated round to
  the next), seconds per round, total seconds and MB sent down and up per run;
- `runs.csv`: the same figures for every run;
- `results.md`: both tables in Markdown, and the runs that did not finish;
- `orderings.csv` (and a section of results.md), where the runs reproduce a column of the
  paper's Table 7: for MH-pFedHN and MH-pFedHNGD against every other method, the paper's order
  and the paired difference over seeds on each accuracy (experiments/orderings.py);
- `accuracy.png` (every experiment, one panel each) and `accuracy-<experiment>.png`: pooled
  accuracy against round, one line per method (mean over seeds, min-max band); for a run of
  30 rounds or more, the second also zooms on the late mean's rounds.
Accuracies are fractions (0..1) in the CSV files and percentages in Markdown.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from common.config import defining_settings
from experiments import orderings
from experiments.paper_table7 import mismatches, paper_accuracy
from server_app.outputs import parse_metrics, read_metrics
from server_app.round_log import select_by_validation

BEST_LABEL = "best round by pooled test accuracy (authors' protocol)"
SELECTED_LABEL = (
    "test accuracy at the round of best pooled validation accuracy (a held-out "
    "part of each client's training data; n/a without data.val_fraction)"
)
FINAL_LABEL = "last evaluated round"
LATE_LABEL = "mean over the evaluated rounds after the first two thirds of the run"
MB = 1e6
ZOOM_FROM_ROUNDS = 30  # runs this long get a second panel on the late rounds


@dataclass
class RunResult:
    run: str
    experiment: str
    method: str
    seed: int
    rounds: int
    final_accuracy: float
    final_round: int
    best_accuracy: float
    best_round: int
    selected_accuracy: float  # at the round chosen on validation data (nan without any)
    selected_round: int
    late_mean_accuracy: float  # one noisy last round cannot swing it, as it can the final
    final_accuracy_client_mean: float
    mean_drop: float  # mean over consecutive evaluated rounds of max(0, previous - current)
    largest_drop: float
    seconds_per_round: float  # mean wall clock of the training rounds (round 0 only evaluates)
    total_seconds: float
    mb_down: float
    mb_up: float
    curve: dict[int, float] = field(default_factory=dict, repr=False)  # round -> accuracy
    # mean client accuracy per architecture at the final round (runs of several models)
    by_architecture: dict[str, float] = field(default_factory=dict, repr=False)
    # the paper's Table 7 figure for this setting and method (nan where it has none)
    paper_accuracy: float = float("nan")
    # what defines the run (common.config.defining_settings of its config.yaml), to find
    # rows and pairs that mix settings; and what keeps it out of Table 7's settings
    settings: dict[str, Any] = field(default_factory=dict, repr=False)
    outside_table7: tuple[str, ...] = field(default=(), repr=False)


@dataclass
class Incomplete:
    run: str
    reason: str
    # a run still going (or stopped): its figures over the rounds it has logged, the "final"
    # ones those of its last evaluated round; None when it evaluated nothing
    so_far: RunResult | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config(directory: Path) -> dict[str, Any]:
    """The run's resolved config.yaml; empty when it is missing or unreadable."""
    try:
        return yaml.safe_load((directory / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _curve(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Pooled accuracy by round, over the rounds that were evaluated."""
    return {int(r["round"]): r["accuracy"] for r in rows if r.get("accuracy") is not None}


def late_start(rounds: int) -> int:
    """The first round of the late mean: rounds 101-150 of a 150-round run."""
    return 2 * rounds // 3 + 1


def _late_mean(curve: dict[int, float], rounds: int) -> float:
    late = [accuracy for r, accuracy in curve.items() if r >= late_start(rounds)]
    return statistics.fmean(late) if late else float("nan")


def _identity(directory: Path) -> tuple[str, str, int]:
    """(experiment, method, seed): from the runner's sweep_run.json, else from config.yaml."""
    info = _read_json(directory / "sweep_run.json")
    if info is not None:
        return str(info["experiment"]), str(info["method"]), int(info["seed"])
    config = _config(directory)
    return (
        str(config.get("name", directory.name)),
        str(config.get("method", "?")),
        int(config.get("seed", 0)),
    )


def _nan_if_none(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _readable_rows(directory: Path) -> list[dict[str, Any]]:
    """An unfinished run's metrics rows up to the first unreadable line (a running run's last
    line may be half written); none when the file cannot be read."""
    try:
        return parse_metrics((directory / "metrics.jsonl").read_text(), up_to_malformed=True)
    except (OSError, ValueError):  # ValueError: not text
        return []


def _progress(rows: list[dict[str, Any]], planned: int | None) -> str:
    """How far an unfinished run got, so that a long run's interim numbers can be quoted."""
    curve = _curve(rows)
    if not curve:
        return ""
    last, best = max(curve), max(curve, key=lambda r: (curve[r], -r))
    of = f" of {planned}" if planned else ""
    late = ""
    if planned and last >= (first := late_start(int(planned))):
        late = f", mean of rounds {first}-{last} {_pct(_late_mean(curve, int(planned)))}%"
    return (
        f"; evaluated up to round {last}{of}: {_pct(curve[last])}% there, "
        f"best so far {_pct(curve[best])}% at round {best}{late}"
    )


def load_run(directory: Path) -> RunResult | Incomplete:
    """One run's figures; Incomplete when it has no summary.json (failed or still running),
    with its figures so far."""
    summary = _read_json(directory / "summary.json")
    if summary is None:
        error = directory / "error.txt"
        reason = "no summary.json"
        if error.is_file():
            lines = [line for line in error.read_text().splitlines() if line.strip()]
            reason += f" ({lines[-1]})" if lines else ""
        rows = latest_per_round(_readable_rows(directory))
        planned = _config(directory).get("rounds")
        so_far = _so_far(directory, rows, planned)
        return Incomplete(directory.name, reason + _progress(rows, planned), so_far)
    return _result(directory, latest_per_round(_finished_rows(directory)), summary)


class UnreadableRun(ValueError):
    """A finished run (it has summary.json) whose metrics.jsonl is missing or malformed: its
    figures cannot be computed, and leaving it out would change the table silently."""


def _finished_rows(directory: Path) -> list[dict[str, Any]]:
    path = directory / "metrics.jsonl"
    try:
        return read_metrics(path)
    except OSError as error:
        raise UnreadableRun(f"{path}: cannot be read ({error.strerror or error})") from error
    except ValueError as error:
        raise UnreadableRun(f"{path}: not JSON lines ({error})") from error


def _so_far(directory: Path, rows: list[dict[str, Any]], planned: int | None) -> RunResult | None:
    """An unfinished run's figures from the rows it has logged, as if it ended there; None
    when it evaluated nothing or its rows are malformed (the report goes on without it)."""
    try:
        return _figures_so_far(directory, rows, planned)
    except (ValueError, KeyError, TypeError):
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(row: dict[str, Any]) -> float | None:
    value = row.get("seconds")
    return float(value) if _finite(value) else None


def _figures_so_far(
    directory: Path, rows: list[dict[str, Any]], planned: int | None
) -> RunResult | None:
    evaluated = [r for r in rows if _finite(r.get("accuracy"))]
    if not evaluated:
        return None
    best = max(evaluated, key=lambda r: (r["accuracy"], -r["round"]))
    summary = {
        "rounds": planned or evaluated[-1]["round"],
        "final_accuracy": evaluated[-1]["accuracy"],
        "final_round": evaluated[-1]["round"],
        "final_accuracy_client_mean": evaluated[-1].get("accuracy_client_mean"),
        "best_accuracy": best["accuracy"],
        "best_round": best["round"],
        "total_seconds": sum(_seconds(r) or 0.0 for r in rows),
        "total_bytes_down": sum(r.get("bytes_down") or 0 for r in rows),
        "total_bytes_up": sum(r.get("bytes_up") or 0 for r in rows),
    }
    return _result(directory, rows, summary)


def latest_per_round(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round, the last logged, in round order. A resume rewrites metrics.jsonl to
    its checkpoint's rounds, but a file appended to by hand or by an older version may repeat
    rounds, and every figure must come from the rows the run kept."""
    by_round = {int(r["round"]): r for r in rows if _finite(r.get("round"))}
    return [by_round[r] for r in sorted(by_round)]


def _result(directory: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> RunResult:
    experiment, method, seed = _identity(directory)
    training = [t for r in rows if r.get("round", 0) > 0 and (t := _seconds(r)) is not None]
    curve = _curve(rows)
    values = [curve[r] for r in sorted(curve)]
    drops = [max(0.0, a - b) for a, b in zip(values, values[1:], strict=False)]
    rounds = int(summary.get("rounds", 0))
    selected = select_by_validation(rows) or {"accuracy": float("nan"), "round": -1}
    config = _config(directory)
    models = config.get("clients", {}).get("models") or []
    return RunResult(
        run=directory.name,
        experiment=experiment,
        method=method,
        seed=seed,
        rounds=rounds,
        final_accuracy=_nan_if_none(summary.get("final_accuracy")),
        final_round=int(summary.get("final_round", -1)),
        best_accuracy=_nan_if_none(summary.get("best_accuracy")),
        best_round=int(summary.get("best_round", -1)),
        selected_accuracy=float(selected["accuracy"]),
        selected_round=int(selected["round"]),
        late_mean_accuracy=_late_mean(curve, rounds),
        final_accuracy_client_mean=_nan_if_none(summary.get("final_accuracy_client_mean")),
        mean_drop=statistics.fmean(drops) if drops else float("nan"),
        largest_drop=max(drops) if drops else float("nan"),
        seconds_per_round=statistics.fmean(training) if training else float("nan"),
        total_seconds=float(summary.get("total_seconds", float("nan"))),
        mb_down=summary.get("total_bytes_down", float("nan")) / MB,
        mb_up=summary.get("total_bytes_up", float("nan")) / MB,
        curve=curve,
        by_architecture=architecture_accuracy(_final_row(rows), models),
        paper_accuracy=paper_accuracy(config, method),
        settings=defining_settings(config),
        outside_table7=tuple(mismatches(config)),
    )


def _final_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    evaluated = [r for r in rows if r.get("client_accuracy")]
    return evaluated[-1] if evaluated else {}


def architecture_accuracy(row: dict[str, Any], models: Sequence[str]) -> dict[str, float]:
    """Mean test accuracy of the clients of each architecture in a metrics row, for runs of
    several models; a simulated client `partition-i` has model models[i mod len(models)]
    (docs/concepts/models.md). Clients named otherwise (deployed sites) are left out."""
    if len(models) < 2:
        return {}
    groups: dict[str, list[float]] = {}
    for key, accuracy in (row.get("client_accuracy") or {}).items():
        index = key.removeprefix("partition-")
        if index.isdigit():
            groups.setdefault(models[int(index) % len(models)], []).append(accuracy)
    return {m: statistics.fmean(groups[m]) for m in models if m in groups}


def load_runs(directory: str | Path) -> tuple[list[RunResult], list[Incomplete]]:
    done, incomplete = [], []
    for sub in sorted(Path(directory).iterdir()):
        marks = ("metrics.jsonl", "sweep_run.json")
        if sub.is_dir() and any((sub / mark).is_file() for mark in marks):
            result = load_run(sub)
            (done if isinstance(result, RunResult) else incomplete).append(result)
    return done, incomplete


# --------------------------------------------------------------- aggregate
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is nan for one value.
    Missing values (nan: e.g. no validation split) are left out; none at all gives nan."""
    values = [v for v in values if not math.isnan(v)]
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std


SUMMARISED = (
    "final_accuracy",
    "best_accuracy",
    "selected_accuracy",
    "late_mean_accuracy",
    "final_accuracy_client_mean",
    "mean_drop",
    "largest_drop",
    "seconds_per_round",
    "total_seconds",
    "mb_down",
    "mb_up",
)


def groups(runs: Iterable[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    """Runs by (experiment, method), sorted, each group's runs by seed."""
    out: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        out.setdefault((run.experiment, run.method), []).append(run)
    return {k: sorted(out[k], key=lambda r: r.seed) for k in sorted(out)}


def aggregate(runs: Iterable[RunResult]) -> list[dict[str, Any]]:
    table = []
    for (experiment, method), members in groups(runs).items():
        rounds = sorted({r.rounds for r in members})
        row: dict[str, Any] = {
            "experiment": experiment,
            "method": method,
            "seeds": len(members),
            "seed_list": " ".join(str(r.seed) for r in members),
            "rounds": rounds[0] if len(rounds) == 1 else "-".join(map(str, rounds)),
        }
        for name in SUMMARISED:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([getattr(r, name) for r in members])
        row["paper_accuracy"] = members[0].paper_accuracy
        row["settings_differ"] = orderings.said(orderings.settings_that_differ(members))
        seeds = [r.seed for r in members]
        row["repeated_seeds"] = " ".join(str(s) for s in sorted(set(seeds)) if seeds.count(s) > 1)
        row["partial_figures"] = " ".join(
            name for name in SUMMARISED
            if 0 < sum(math.isnan(getattr(r, name)) for r in members) < len(members)
        )  # fmt: skip
        row["best_selected_by"] = BEST_LABEL
        row["selected_by"] = SELECTED_LABEL
        table.append(row)
    return table


# ------------------------------------------------------------------ writers
def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return repr(value) if isinstance(value, float) else value


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row[c]) for c in columns])


def _pct(mean: float, std: float = float("nan")) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}")


def _round(number: int) -> str:
    return "n/a" if number < 0 else str(number)


def _num(mean: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:,.{digits}f}"


def markdown(
    table: list[dict[str, Any]],
    runs: list[RunResult],
    incomplete: list[Incomplete],
    title: str,
    compared: tuple[list[orderings.Comparison], list[str]] | None = None,
) -> str:
    """results.md; `compared`: orderings.compare(runs), the paper's orderings section."""
    lines = [
        f"# Results: {title}",
        "",
        "Pooled test accuracy (%) of the generated parameters, mean ± sample standard deviation "
        f"over seeds. Final: {FINAL_LABEL}. Best: {BEST_LABEL}. Val-selected: "
        f"{SELECTED_LABEL}. Late mean: {LATE_LABEL} "
        "(rounds 101-150 of a 150-round run). Seconds per round: mean wall "
        "clock of a training round. Drops: how far pooled accuracy fell from one evaluated "
        "round to the next (mean over all consecutive pairs, rises counting 0; and the largest), "
        "in percentage points. Total seconds and MB (10^6 bytes of array payload sent "
        "down to / up from the clients, as they travelled) are per run, averaged over seeds.",
        "",
        "| experiment | method | seeds | rounds | final acc (%) | best acc (%) "
        "| val-selected acc (%) | late mean acc (%) | paper (%) | final client-mean acc (%) "
        "| mean drop (pts) | largest drop (pts) "
        "| s / round | total s / run | MB down / run | MB up / run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        client_mean = (row[f"final_accuracy_client_mean_{s}"] for s in ("mean", "std"))
        lines.append(
            f"| {row['experiment']} | {row['method']} | {row['seeds']} | {row['rounds']} "
            f"| {_pct(row['final_accuracy_mean'], row['final_accuracy_std'])} "
            f"| {_pct(row['best_accuracy_mean'], row['best_accuracy_std'])} "
            f"| {_pct(row['selected_accuracy_mean'], row['selected_accuracy_std'])} "
            f"| {_pct(row['late_mean_accuracy_mean'], row['late_mean_accuracy_std'])} "
            f"| {_pct(row['paper_accuracy'])} | {_pct(*client_mean)} "
            f"| {_pct(row['mean_drop_mean'], row['mean_drop_std'])} "
            f"| {_pct(row['largest_drop_mean'], row['largest_drop_std'])} "
            f"| {_num(row['seconds_per_round_mean'])} | {_num(row['total_seconds_mean'])} "
            f"| {_num(row['mb_down_mean'], 2)} | {_num(row['mb_up_mean'], 2)} |"
        )
    lines += _mixed_rows(table)
    lines += [
        "",
        "![accuracy against round](accuracy.png)",
        "",
        *_with_blank(orderings.markdown(*(compared or ([], []))) or _no_orderings(runs)),
        "## Runs",
        "",
        "| run | seed | final acc (%) | final round | best acc (%) | best round "
        "| val-selected acc (%) | selected round "
        "| late mean acc (%) | s / round | total s | MB down | MB up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(runs, key=lambda r: (r.experiment, r.method, r.seed)):
        lines.append(
            f"| {run.run} | {run.seed} | {_pct(run.final_accuracy)} | {run.final_round} "
            f"| {_pct(run.best_accuracy)} | {run.best_round} "
            f"| {_pct(run.selected_accuracy)} | {_round(run.selected_round)} "
            f"| {_pct(run.late_mean_accuracy)} "
            f"| {_num(run.seconds_per_round)} "
            f"| {_num(run.total_seconds)} | {_num(run.mb_down, 2)} | {_num(run.mb_up, 2)} |"
        )
    by_architecture = _architecture_markdown(runs, "at the final round")
    if by_architecture:
        lines += ["", "## Accuracy by architecture", *by_architecture]
    if incomplete:
        lines += ["", "## Runs without results", ""]
        lines += [f"- {item.run}: {item.reason}" for item in incomplete]
    lines += _so_far_markdown([item.so_far for item in incomplete if item.so_far])
    return "\n".join(lines) + "\n"


def _mixed_rows(table: list[dict[str, Any]]) -> list[str]:
    """Warnings under the table: a row whose runs differ in a setting (other than the seed),
    and an experiment whose rows ran for different numbers of rounds."""
    lines = [f"- **{row['experiment']} / {row['method']} mixes settings**: its runs differ in "
             f"{row['settings_differ']}; its mean and spread are not those of one setting."
             for row in table if row["settings_differ"]]  # fmt: skip
    lines += [f"- **{row['experiment']} / {row['method']} has more than one run of seed "
              f"{row['repeated_seeds']}**: they count as separate seeds in its mean and spread."
              for row in table if row["repeated_seeds"]]  # fmt: skip
    lines += [f"- **{row['experiment']} / {row['method']}: {row['partial_figures']} missing from "
              "some runs**: those means and spreads are over fewer runs than its seeds."
              for row in table if row["partial_figures"]]  # fmt: skip
    lines += [f"- **{row['experiment']} / {row['method']} mixes run lengths** ({row['rounds']} "
              "rounds): its mean and spread are not those of one length."
              for row in table if not isinstance(row["rounds"], int)]  # fmt: skip
    lengths: dict[str, set[int]] = {}
    for row in table:
        if isinstance(row["rounds"], int):
            lengths.setdefault(row["experiment"], set()).add(row["rounds"])
    lines += [f"- **{experiment}: rows of different lengths** "
              f"({', '.join(map(str, sorted(rounds)))} rounds): compare its rows with care."
              for experiment, rounds in lengths.items() if len(rounds) > 1]  # fmt: skip
    seed_sets: dict[str, dict[str, list[str]]] = {}
    for row in table:
        seed_sets.setdefault(row["experiment"], {}).setdefault(row["seed_list"], []).append(
            row["method"]
        )
    lines += [f"- **{experiment}: rows over different seeds** ("
              + "; ".join(f"{', '.join(methods)}: {seeds}" for seeds, methods in sets.items())
              + "): a seed draws the partition, so rows over other seeds differ by more than "
              "their methods; the orderings pair methods seed by seed."
              for experiment, sets in seed_sets.items() if len(sets) > 1]  # fmt: skip
    return ["", *lines] if lines else []


def _no_orderings(runs: list[RunResult]) -> list[str]:
    """Why results.md has no orderings section, when it has runs of ours to order."""
    ours = [r for r in runs if r.method in orderings.OURS]
    if not ours or not all(r.outside_table7 for r in ours):
        return []
    reasons = sorted({reason for r in ours for reason in r.outside_table7})
    return [
        "## The paper's orderings",
        "",
        "Not compared: these runs are in no setting of the paper's Table 7 ("
        + "; ".join(reasons)
        + "). docs/concepts/metrics.md says which settings are.",
    ]


def _so_far_markdown(going: list[RunResult]) -> list[str]:
    """The unfinished runs' figures over the rounds they have logged (none is final)."""
    if not going:
        return []
    lines = [
        "",
        "## Runs without results: their figures so far",
        "",
        "Over the rounds each has logged: its last evaluated round stands for the final one; "
        "the late mean needs the last third of the planned rounds.",
        "",
        "![every run so far](progress.png)",
        "",
        "| run | round of planned | last acc (%) | best so far (%) | best round "
        "| val-selected so far (%) | selected round | late mean so far (%) | s / round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(going, key=lambda r: (r.experiment, r.method, r.seed)):
        lines.append(
            f"| {run.run} | {run.final_round} of {run.rounds} | {_pct(run.final_accuracy)} "
            f"| {_pct(run.best_accuracy)} | {run.best_round} "
            f"| {_pct(run.selected_accuracy)} | {_round(run.selected_round)} "
            f"| {_pct(run.late_mean_accuracy)} | {_num(run.seconds_per_round)} |"
        )
    lines += _architecture_markdown(going, "at the last round so far")
    return lines


def _architecture_markdown(runs: list[RunResult], when: str) -> list[str]:
    """Mean test accuracy of each architecture's clients, for the runs of several models."""
    mixed = [r for r in runs if r.by_architecture]
    if not mixed:
        return []
    names = list(dict.fromkeys(m for r in mixed for m in r.by_architecture))
    lines = [
        "",
        f"Mean test accuracy (%) of each architecture's clients {when}.",
        "",
        "| run | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for run in sorted(mixed, key=lambda r: (r.experiment, r.method, r.seed)):
        cells = [_pct(run.by_architecture.get(n, float("nan"))) for n in names]
        lines.append(f"| {run.run} | " + " | ".join(cells) + " |")
    return lines


def _with_blank(section: list[str]) -> list[str]:
    return [*section, ""] if section else []


def comparable(lines: dict[str, list[RunResult]]) -> tuple[dict[str, list[RunResult]], str]:
    """Each method's runs of the seeds every method finished, and what they are: the seeds
    differ in their partitions, so a mean over seeds 0-2 beside one of seed 0 alone would
    compare the seeds, not the methods. Without a seed in common, every run, said so."""
    shared = set.intersection(*({m.seed for m in members} for members in lines.values()))
    if not shared:
        return lines, "the methods' seeds differ"
    said = f"seed{'s' * (len(shared) > 1)} {', '.join(map(str, sorted(shared)))}"
    if any(m.seed not in shared for members in lines.values() for m in members):
        said += ", those every method finished"
    return {k: [m for m in ms if m.seed in shared] for k, ms in lines.items()}, said


def plot(runs: list[RunResult], directory: Path) -> list[Path]:
    """accuracy.png (a panel per experiment), accuracy-<experiment>.png, and for a sweep of
    variants (one method per experiment) accuracy-variants.png with every variant on one axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_experiment: dict[str, dict[str, list[RunResult]]] = {}
    for (experiment, method), members in groups(runs).items():
        by_experiment.setdefault(experiment, {})[method] = members
    if not by_experiment:
        return []

    def draw(ax, experiment: str, first: int = 0) -> None:
        lines, seeds = comparable(by_experiment[experiment])
        title = f"{experiment}\n{seeds}; mean, min-max band"
        _draw_curves(ax, lines, title if first == 0 else
                     f"rounds {first}+\nthe late mean's window", first)  # fmt: skip

    written = []
    for experiment in by_experiment:
        planned = max(m.rounds for ms in by_experiment[experiment].values() for m in ms)
        if planned >= ZOOM_FROM_ROUNDS:  # a long run's plateau is lost on a 0-100 axis
            fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4))
            draw(zoom, experiment, first=late_start(planned))
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, experiment)
        fig.tight_layout()
        path = directory / f"accuracy-{experiment}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    count = len(by_experiment)
    path = directory / "accuracy.png"
    _save_panels(path, [functools.partial(draw, experiment=e) for e in by_experiment])
    methods = {method for lines in by_experiment.values() for method in lines}
    if count > 1 and all(len(lines) == 1 for lines in by_experiment.values()):
        # a sweep of variants of one method per experiment: every variant on one axes
        fig, ax = plt.subplots(figsize=(8, 5))
        lines = {experiment: next(iter(ms.values())) for experiment, ms in by_experiment.items()}
        _draw_curves(ax, lines, " / ".join(sorted(methods)) + ": every variant")
        fig.tight_layout()
        written.append(directory / "accuracy-variants.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return [path, *written]


def plot_progress(done: list[RunResult], going: list[RunResult], directory: Path) -> list[Path]:
    """progress.png while some runs are unfinished (going, stopped or failed): every run, one
    line each (a panel per experiment), the unfinished ones labelled with the round they
    reached; none (and an old one removed) once every run has finished."""
    path = directory / "progress.png"
    if not going:
        path.unlink(missing_ok=True)
        return []
    import matplotlib

    matplotlib.use("Agg")
    unfinished = {id(run) for run in going}
    panels: dict[str, dict[str, list[RunResult]]] = {}
    for run in sorted(done + going, key=lambda r: (r.experiment, r.method, r.seed)):
        lines = panels.setdefault(run.experiment, {})
        label = f"{run.method} s{run.seed}"
        label = run.run if label in lines else label
        if id(run) in unfinished:
            label += f" (round {run.final_round} of {run.rounds})"
        lines[label] = [run]
    _save_panels(path, [
        functools.partial(_draw_curves, lines=lines, title=f"{experiment}: every run so far")
        for experiment, lines in panels.items()
    ])  # fmt: skip
    return [path]


def _save_panels(path: Path, draws: list[Callable[..., None]]) -> None:
    """A figure of one panel per `draws` entry (each called with its axes), two a row."""
    import matplotlib.pyplot as plt

    cols = min(len(draws), 2)
    rows = math.ceil(len(draws) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, draws, strict=False):
        draw(ax)
    for ax in list(axes.flat)[len(draws) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_curves(ax, lines: dict[str, list[RunResult]], title: str, first: int = 0) -> None:
    """One line per label (the mean over its runs' seeds) with a min-max band."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    if len(lines) > 10:  # past the default cycle's 10 colours, lines would share colours
        ax.set_prop_cycle(color=colormaps["tab20"].colors)
    shown: dict[str, list[float]] = {}
    for label, members in lines.items():
        rounds = sorted({r for m in members for r in m.curve if r >= first})
        values = [[100 * m.curve[r] for m in members if r in m.curve] for r in rounds]
        mean = [statistics.fmean(v) for v in values]
        (line,) = ax.plot(rounds, mean, marker="o", markersize=3, label=label)
        ax.fill_between(
            rounds, [min(v) for v in values], [max(v) for v in values],
            color=line.get_color(), alpha=0.2, linewidth=0,
        )  # fmt: skip
        shown[label] = [x for v in values for x in v]
    if first and shown:  # the late window is for telling close lines apart
        title += _zoom_on_the_leaders(ax, shown)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("pooled test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _zoom_on_the_leaders(ax, shown: dict[str, list[float]], gap: float = 10.0) -> str:
    """Limit the y axis to the lines whose late mean is within `gap` points of the best one,
    so that one far-behind method (FedAvg) does not flatten the others; returns a note for
    the title naming what was left below the window."""
    means = {label: statistics.fmean(v) for label, v in shown.items() if v}
    if not means:
        return ""
    best = max(means.values())
    kept = [x for label, v in shown.items() if means.get(label, -1) >= best - gap for x in v]
    below = sorted(label for label, mean in means.items() if mean < best - gap)
    if not below:
        return ""
    ax.set_ylim(min(kept) - 0.5, max(kept) + 0.5)
    return f"; below: {', '.join(below)}"


# runs.csv: every figure of a run, in RunResult's order (not the curves)
NOT_IN_CSV = ("curve", "by_architecture", "settings", "outside_table7")
RUN_COLUMNS = [f.name for f in fields(RunResult) if f.name not in NOT_IN_CSV]
RESULT_COLUMNS = [
    "experiment",
    "method",
    "seeds",
    "seed_list",
    "rounds",
    *(f"{name}_{stat}" for name in SUMMARISED for stat in ("mean", "std")),
    "paper_accuracy",
    "settings_differ",
    "repeated_seeds",
    "partial_figures",
    "best_selected_by",
    "selected_by",
]


def title_of(directory: Path) -> str:
    """The sweep's name (from the runner's sweep_status.json) when one sweep made the folder,
    with the folder's name if that differs; otherwise the folder's name."""
    try:
        status = json.loads((directory / "sweep_status.json").read_text())
        names = {r.get("sweep") for r in status["runs"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        names = set()
    name = names.pop() if len(names) == 1 else None
    if not isinstance(name, str) or name == directory.name:
        return directory.name
    return f"{name} (folder {directory.name})"


def write_report(directory: str | Path) -> dict[str, Any]:
    """Write results.csv, runs.csv, results.md and the plots; returns what it found.

    A folder without run folders gets nothing written (empty "runs" and "incomplete"), so that
    a mistyped path cannot replace a committed table with an empty one."""
    directory = Path(directory)
    runs, incomplete = load_runs(directory)
    if not runs and not incomplete:
        return {"table": [], "runs": [], "incomplete": [], "plots": [], "orderings": []}
    table = aggregate(runs)
    write_csv(directory / "results.csv", table, RESULT_COLUMNS)
    write_csv(directory / "runs.csv", [asdict(r) for r in runs], RUN_COLUMNS)
    compared = orderings.compare(runs)
    comparisons = compared[0]
    if comparisons:
        write_csv(directory / "orderings.csv", orderings.rows(comparisons), orderings.COLUMNS)
    else:  # a report of other runs must not leave an old table beside them
        (directory / "orderings.csv").unlink(missing_ok=True)
    (directory / "results.md").write_text(
        markdown(table, runs, incomplete, title_of(directory), compared)
    )
    plots = plot(runs, directory)
    plots += plot_progress(runs, [i.so_far for i in incomplete if i.so_far], directory)
    return {"table": table, "runs": runs, "incomplete": incomplete, "plots": plots,
            "orderings": comparisons}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", help="a folder of run folders (the runner's --out)")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"error: {directory} is not a folder", file=sys.stderr)
        return 2
    try:
        found = write_report(directory)
    except UnreadableRun as error:
        print(f"error: {error}; the run has a summary.json, so it finished and its figures "
              "would be missing from the table: nothing written, its results.* files are left "
              "as they are", file=sys.stderr)  # fmt: skip
        return 2
    if not found["runs"] and not found["incomplete"]:
        print(
            f"error: {directory} holds no run folders (a <run>/metrics.jsonl); "
            "nothing written, its results.* files are left as they are",
            file=sys.stderr,
        )
        return 2
    print(
        f"{len(found['runs'])} runs ({len(found['incomplete'])} without results) -> "
        f"{directory / 'results.md'}, results.csv, runs.csv, accuracy.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
