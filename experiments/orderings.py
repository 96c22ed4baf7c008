"""The paper's orderings, checked over seeds: for MH-pFedHN and MH-pFedHNGD against every other
method of an experiment, the paper's order (its Table 7, experiments/paper_table7.py) and the
paired difference of this folder's runs, seed by seed, for each of the four accuracies.

Pairing by seed removes what two methods share in a seed (the partition, the validation split,
the initial embeddings' draw), so the spread is that of the difference, not of either method.
An ordering *holds* when it holds in every seed both methods ran, is *reversed* when the other
order holds in every seed, and is *mixed* otherwise; the count says in how many seeds it held.
One seed says only whether that seed went as the paper or against it.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from common.config import method_sections

# the report's accuracies, labelled as in its tables (experiments/report.py)
MEASURES = (
    ("selected_accuracy", "val-selected"),
    ("best_accuracy", "best test"),
    ("final_accuracy", "final"),
    ("late_mean_accuracy", "late mean"),
)
OURS = ("mh_pfedhn", "mh_pfedhngd")


@functools.cache
def method_specific() -> tuple[str, ...]:
    """What two methods' runs may differ in and still be paired: the method, and each
    method's own settings section (looked up once, when first paired: it imports them all)."""
    return ("method", *method_sections())


@dataclass(frozen=True)
class Comparison:
    """One of the paper's orderings (higher above lower) on one accuracy, over shared seeds."""

    experiment: str
    higher: str  # the method the paper puts higher
    lower: str
    paper_difference: float  # points, > 0
    measure: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # higher - lower, in points, one per seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences) if self.differences else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else math.nan

    @property
    def held(self) -> int:
        return sum(d > 0 for d in self.differences)

    @property
    def verdict(self) -> str:
        """holds / reversed / level (the paper's order, the other, equal) in every seed, else
        mixed; with one seed only "as the paper" or "against the paper": one seed cannot say
        that an order holds."""
        d = self.differences
        if not d:
            return "n/a"
        if len(d) == 1:
            return {1: "as the paper", -1: "against the paper", 0: "level"}[_sign(d[0])]
        signs = {_sign(x) for x in d}
        return {1: "holds", -1: "reversed", 0: "level"}[signs.pop()] if len(signs) == 1 else "mixed"


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _by_seed(runs: Iterable[Any], measure: str) -> dict[int, float]:
    values = {run.seed: getattr(run, measure) for run in runs}
    return {seed: value for seed, value in values.items() if not math.isnan(value)}


def settings_that_differ(runs: Sequence[Any], ignore: Iterable[str] = ()) -> dict[str, list]:
    """The defining settings (a run's `settings`, seed left out) in which `runs` differ: for
    each key, its values in the order first seen. Keys under a section or name of `ignore` are
    not compared; a key is compared among the runs that have it (a config.yaml written by an
    older version may lack it)."""
    ignored = tuple(ignore)
    keys = sorted(set().union(*(r.settings for r in runs))) if runs else []
    out = {}
    for key in keys:
        if key == "seed" or key in ignored or key.split(".", 1)[0] in ignored:
            continue
        values = list(dict.fromkeys(repr(r.settings[key]) for r in runs if key in r.settings))
        if len(values) > 1:
            out[key] = values
    return out


def said(differences: dict[str, list]) -> str:
    """`client.lr (0.005, 0.02)` for each setting that differs."""
    return "; ".join(f"{key} ({', '.join(values)})" for key, values in differences.items())


def _unpairable(members: list[Any]) -> str:
    """Why a method's runs cannot enter the pairing ('' when they can)."""
    seeds = [r.seed for r in members]
    if len(set(seeds)) < len(seeds):
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        return f"more than one run of seed {', '.join(map(str, repeated))}"
    if differ := settings_that_differ(members):
        return f"its runs differ in settings: {said(differ)}"
    figures = {r.paper_accuracy for r in members}
    if len(figures) > 1 or any(math.isnan(f) for f in figures):
        return "not every run is in a setting of the paper's Table 7"
    if len({r.rounds for r in members}) > 1:
        return "runs of different lengths"
    return ""


def compare(runs: Sequence[Any]) -> tuple[list[Comparison], list[str]]:
    """Every ordering of MH-pFedHN / MH-pFedHNGD against another method of the same experiment
    for which the paper gives both figures (unequal), on each measure; and notes on the methods
    left out (repeated seeds, runs outside the paper's setting, runs of different lengths).
    `runs` are the report's RunResult objects."""
    by_experiment: dict[str, dict[str, list[Any]]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, {}).setdefault(run.method, []).append(run)
    out: list[Comparison] = []
    notes: list[str] = []
    for experiment, methods in sorted(by_experiment.items()):
        if not any(m in methods for m in OURS):
            continue
        usable = {}
        for method, members in sorted(methods.items()):
            reason = _unpairable(members)
            if reason and not all(math.isnan(r.paper_accuracy) for r in members):
                notes.append(f"{experiment}: {method} left out ({reason})")
            elif not reason:
                usable[method] = members
        rounds = {m: members[0].rounds for m, members in usable.items()}
        pairs = []
        for ours in (m for m in OURS if m in usable):
            pairs += [(ours, other) for other in sorted(usable) if other != ours
                      and (other, ours) not in pairs]  # fmt: skip
        for a, b in pairs:
            if rounds[a] != rounds[b]:
                notes.append(f"{experiment}: {a} and {b} not paired ({rounds[a]} rounds "
                             f"against {rounds[b]})")  # fmt: skip
                continue
            # each method's own section may differ; everything they share must not
            if differ := settings_that_differ(usable[a] + usable[b], method_specific()):
                notes.append(f"{experiment}: {a} and {b} not paired (their settings differ: "
                             f"{said(differ)})")  # fmt: skip
                continue
            paper = {m: usable[m][0].paper_accuracy for m in (a, b)}
            if paper[a] == paper[b]:
                continue
            higher, lower = (a, b) if paper[a] > paper[b] else (b, a)
            for measure, _ in MEASURES:
                up, down = _by_seed(usable[higher], measure), _by_seed(usable[lower], measure)
                seeds = tuple(sorted(up.keys() & down.keys()))
                out.append(Comparison(
                    experiment, higher, lower, 100 * (paper[higher] - paper[lower]), measure,
                    seeds, tuple(100 * (up[s] - down[s]) for s in seeds),
                ))  # fmt: skip
    return out, notes


def _cell(c: Comparison) -> str:
    if not c.differences:
        return "n/a"
    if len(c.differences) == 1:
        return f"{c.mean:+.2f} {c.verdict} (seed {c.seeds[0]} only)"
    return f"{c.mean:+.2f} ± {c.std:.2f} {c.verdict} ({c.held} of {len(c.differences)} seeds)"


def markdown(comparisons: Sequence[Comparison], notes: Sequence[str] = ()) -> list[str]:
    """The section of results.md: one line per ordering, a column per accuracy."""
    if not comparisons and not notes:
        return []
    lines = [
        "## The paper's orderings, paired over seeds",
        "",
        "MH-pFedHN and MH-pFedHNGD, each against every other method of the experiment with a "
        "figure in the paper's Table 7: the paper's order, by how much it puts the higher method "
        "ahead, and, per accuracy, this folder's difference higher minus lower in that order, "
        "computed seed by seed over the seeds both methods finished, in points: mean ± sample "
        "standard deviation and whether the paper's order **holds** in every seed, is **reversed**"
        " in every seed, is **level** (equal in every seed) or is **mixed**. One seed gives no "
        "spread and cannot say that an order holds: such a cell says only whether that seed went "
        "as the paper or against it. The paper's figures are best rounds within up to 500 rounds, "
        "averaged over three runs; these runs are as long as the table above says. Runs without "
        "results (listed at the end) are not included.",
        "",
        "| experiment | paper's order | paper (pts) | seeds "
        + "".join(f"| {label} " for _, label in MEASURES)
        + "|",
        "|---|---|---:|---|" + "---|" * len(MEASURES),
    ]
    rows: dict[tuple[str, str, str], dict[str, Comparison]] = {}
    for c in comparisons:
        rows.setdefault((c.experiment, c.higher, c.lower), {})[c.measure] = c
    for (experiment, higher, lower), cells in rows.items():
        first = next(iter(cells.values()))
        seeds = sorted({s for c in cells.values() for s in c.seeds})
        lines.append(
            f"| {experiment} | {higher} > {lower} | {first.paper_difference:+.2f} "
            f"| {' '.join(map(str, seeds)) or 'none'} "
            + "".join(f"| {_cell(cells[m])} " for m, _ in MEASURES)
            + "|"
        )
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return lines


COLUMNS = [
    "experiment", "higher", "lower", "paper_difference", "measure", "seeds", "differences",
    "mean", "std", "min", "max", "held", "verdict",
]  # fmt: skip


def rows(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    """orderings.csv: one row per ordering and accuracy, every seed's difference spelled out."""
    return [
        {
            "experiment": c.experiment,
            "higher": c.higher,
            "lower": c.lower,
            "paper_difference": c.paper_difference,
            "measure": c.measure,
            "seeds": " ".join(map(str, c.seeds)),
            "differences": " ".join(f"{d:.4f}" for d in c.differences),
            "mean": c.mean,
            "std": c.std,
            "min": min(c.differences, default=math.nan),
            "max": max(c.differences, default=math.nan),
            "held": c.held,
            "verdict": c.verdict,
        }  # fmt: skip
        for c in comparisons
    ]
