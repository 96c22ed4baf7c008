"""The paper's orderings, checked over seeds: for MH-pFedHN and MH-pFedHNGD against every other
method of an experiment, the paper's order (its Table 7, experiments/paper_table7.py) and the
paired difference of this folder's runs, seed by seed, for each of the four accuracies.

Pairing by seed removes what two methods share in a seed (the partition, the validation split,
the initial embeddings' draw), so the spread is that of the difference, not of either method.
An ordering *holds* when it holds in every seed both methods ran, is *reversed* when the other
order holds in every seed, and is *mixed* otherwise; the count says in how many seeds it held.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# the report's accuracies, labelled as in its tables (experiments/report.py)
MEASURES = (
    ("selected_accuracy", "val-selected"),
    ("best_accuracy", "best test"),
    ("final_accuracy", "final"),
    ("late_mean_accuracy", "late mean"),
)
OURS = ("mh_pfedhn", "mh_pfedhngd")


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
        if not self.differences:
            return "n/a"
        if self.held == len(self.differences):
            return "holds"
        if all(d < 0 for d in self.differences):
            return "reversed"
        return "mixed"


def _by_seed(runs: Iterable[Any], measure: str) -> dict[int, float]:
    values = {run.seed: getattr(run, measure) for run in runs}
    return {seed: value for seed, value in values.items() if not math.isnan(value)}


def compare(runs: Sequence[Any]) -> list[Comparison]:
    """Every ordering of MH-pFedHN / MH-pFedHNGD against another method of the same experiment
    for which the paper gives both figures (unequal), on each measure. `runs` are the report's
    RunResult objects (experiment, method, seed, paper_accuracy and the four accuracies)."""
    by_experiment: dict[str, dict[str, list[Any]]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, {}).setdefault(run.method, []).append(run)
    out = []
    for experiment, methods in sorted(by_experiment.items()):
        pairs = []
        for ours in (m for m in OURS if m in methods):
            pairs += [(ours, other) for other in sorted(methods) if other != ours
                      and (other, ours) not in pairs]  # fmt: skip
        for a, b in pairs:
            paper = {m: methods[m][0].paper_accuracy for m in (a, b)}
            if any(math.isnan(v) for v in paper.values()) or paper[a] == paper[b]:
                continue
            higher, lower = (a, b) if paper[a] > paper[b] else (b, a)
            for measure, _ in MEASURES:
                up, down = _by_seed(methods[higher], measure), _by_seed(methods[lower], measure)
                seeds = tuple(sorted(up.keys() & down.keys()))
                out.append(Comparison(
                    experiment, higher, lower, 100 * (paper[higher] - paper[lower]), measure,
                    seeds, tuple(100 * (up[s] - down[s]) for s in seeds),
                ))  # fmt: skip
    return out


def _cell(c: Comparison) -> str:
    if not c.differences:
        return "n/a"
    spread = "" if math.isnan(c.std) else f" ± {c.std:.2f}"
    return f"{c.mean:+.2f}{spread} {c.verdict} ({c.held}/{len(c.differences)})"


def markdown(comparisons: Sequence[Comparison]) -> list[str]:
    """The section of results.md: one line per ordering, a column per accuracy."""
    if not comparisons:
        return []
    lines = [
        "## The paper's orderings, paired over seeds",
        "",
        "For MH-pFedHN and MH-pFedHNGD against each other method: the paper's order (its "
        "Table 7) and, per accuracy, the difference higher minus lower in that order, seed by "
        "seed over the seeds both ran, in points: mean ± sample standard deviation, then "
        "whether the order holds in every seed, is reversed in every seed, or is mixed, with "
        "the count of seeds where it held.",
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
