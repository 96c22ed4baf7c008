"""accuracy.png for one run (or several, overlaid): what its metrics.jsonl measured by round.

Every run writes one next to its metrics when it ends. Lines: pooled accuracy; with novel
clients, novel (solid) and training clients (dashed) as in the paper's Figures 3-5; with a
global model, its accuracy (dotted).

    python -m server_app.run_plot outputs/run-a outputs/run-b --out compare.png
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server_app.events import RunObserver
from server_app.outputs import read_metrics

logger = logging.getLogger("flwr.mh_pfedhn")

CURVES = (  # metrics key, label, line style
    ("accuracy", "all clients", "-"),
    ("novel_accuracy", "novel clients", "-"),
    ("training_accuracy", "training clients", "--"),
    ("global_accuracy", "global model", ":"),
)


class PlotWhenFinished(RunObserver):
    """Writes <run directory>/accuracy.png when the run ends; a plotting problem is logged,
    it never fails the run (its numbers are already saved)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def run_finished(self, summary: dict[str, Any]) -> None:
        try:
            plot_runs([self.directory], self.directory / "accuracy.png")
        except Exception as err:  # noqa: BLE001
            logger.warning("could not plot %s: %s", self.directory, err)


def plot_runs(directories: Sequence[str | Path], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:  # a run's unreadable metrics must not leave the figure open (sweeps plot many)
        for directory in directories:
            directory = Path(directory)
            rows = read_metrics(directory / "metrics.jsonl")
            run_label = f"{directory.name}: " if len(directories) > 1 else ""
            split = any(r.get("novel_accuracy") is not None for r in rows)
            color = None
            for key, label, style in CURVES:
                if split and key == "accuracy":
                    continue  # novel + training say more than their pool
                points = [(r["round"], 100 * r[key]) for r in rows if r.get(key) is not None]
                if not points:
                    continue
                x, y = zip(*points, strict=True)
                (line,) = ax.plot(x, y, style, color=color, marker="o", markersize=2.5,
                                  label=f"{run_label}{label}")  # fmt: skip
                if len(directories) > 1:
                    color = line.get_color()  # one colour per run, one style per curve
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("pooled test accuracy (%)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no evaluated round yet", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        out = Path(out)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default: <run>/accuracy.png for one run)")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        parser.error(f"no metrics.jsonl in {missing}")
    if args.out is None and len(args.runs) > 1:
        parser.error("--out is needed to overlay several runs")
    out = args.out or Path(args.runs[0]) / "accuracy.png"
    print(plot_runs(args.runs, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
