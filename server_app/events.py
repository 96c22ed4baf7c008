"""Progress events of a run, for whoever watches it: the console, the run directory, the
sweep runner's progress bars, experiment trackers.

The round loop calls every observer's methods in order; an observer overrides those it needs.
An observer that raises is logged and dropped from the run: watching never stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig

logger = logging.getLogger("flwr.mh_pfedhn")


class RunObserver:
    def run_started(self, cfg: ExperimentConfig, first_round: int, num_rounds: int) -> None:
        """Before the first round of this invocation (a resumed run starts after round 0)."""

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        """A round's metrics.jsonl row, as soon as the round ends."""

    def checkpoint_saved(self, server_round: int, path: Path) -> None:
        """The checkpoint after `server_round` is on disk."""

    def run_finished(self, summary: dict[str, Any]) -> None:
        """After the last round, with the run's summary (final and best)."""


class Observers(RunObserver):
    """Passes each event to every observer in turn; one that fails is reported and dropped."""

    def __init__(self, observers: Iterable[RunObserver] = ()) -> None:
        self.observers = list(observers)

    def run_started(self, cfg: ExperimentConfig, first_round: int, num_rounds: int) -> None:
        self._notify("run_started", cfg, first_round, num_rounds)

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        self._notify("round_finished", row, num_rounds)

    def checkpoint_saved(self, server_round: int, path: Path) -> None:
        self._notify("checkpoint_saved", server_round, path)

    def run_finished(self, summary: dict[str, Any]) -> None:
        self._notify("run_finished", summary)

    def _notify(self, event: str, *args: Any) -> None:
        for observer in list(self.observers):
            try:
                getattr(observer, event)(*args)
            except Exception as err:  # noqa: BLE001 - watching never stops training
                logger.warning("%s failed in %s (%s); it is dropped from this run",
                               type(observer).__name__, event, err)  # fmt: skip
                self.observers.remove(observer)


class ConsoleProgress(RunObserver):
    """One line per round: `[round 3/20] accuracy 0.7421 (client mean 0.7310) | ...`, and one
    at the end with the final and best rounds and where the outputs are."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        logger.info("%s", progress_line(row, num_rounds))

    def run_finished(self, summary: dict[str, Any]) -> None:
        logger.info("%s", closing_line(summary, self.directory))


def closing_line(summary: dict[str, Any], directory: Path | None = None) -> str:
    text = f"done after round {summary['rounds']}"
    if "final_accuracy" in summary:
        text += (
            f" | final accuracy {summary['final_accuracy']:.4f} (round {summary['final_round']})"
            f" | best {summary['best_accuracy']:.4f} (round {summary['best_round']})"
        )
    text += (
        f" | {summary['total_seconds']:.1f} s | down {summary['total_bytes_down'] / 1e6:.2f} MB"
        f" up {summary['total_bytes_up'] / 1e6:.2f} MB"
    )
    rejected = summary.get("rejected", {})
    if rejected:  # keyed by client and phase; a timeout counts too
        count = sum(entry["count"] for entry in rejected.values())
        clients = len({entry["client"] for entry in rejected.values()})
        text += f" | {count} replies refused or missing, from {clients} clients (summary.json)"
    if summary.get("unadmitted_nodes"):
        text += f" | {len(summary['unadmitted_nodes'])} nodes never admitted (summary.json)"
    return text if directory is None else f"{text} | outputs: {directory}"


def progress_line(row: dict[str, Any], num_rounds: int) -> str:
    acc = row["accuracy"]
    text = f"[round {row['round']}/{num_rounds}] accuracy {'n/a' if acc is None else f'{acc:.4f}'}"
    if row["accuracy_client_mean"] is not None:
        text += f" (client mean {row['accuracy_client_mean']:.4f})"
    if row.get("global_accuracy") is not None:
        text += f" | global model {row['global_accuracy']:.4f}"
    for role in ("novel", "training"):
        if row.get(f"{role}_accuracy") is not None:
            text += f" | {role} {row[f'{role}_accuracy']:.4f}"
    loss = row["loss"]
    text += f" | loss {'n/a' if loss is None else f'{loss:.4f}'} | {row['seconds']:.1f} s"
    text += f" | down {row['bytes_down'] / 1e6:.2f} MB up {row['bytes_up'] / 1e6:.2f} MB"
    if row["rejected"]:
        text += f" | {len(row['rejected'])} rejected"
    return text
