"""Progress bars for runs: moved by a run's observer in this process, or by following the
metrics.jsonl that a run in another process writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from server_app.events import RunObserver, progress_line
from server_app.outputs import read_metrics


class RoundBar(RunObserver):
    """Moves a progress bar as the run's rounds end (and prints each round when `echo`)."""

    def __init__(self, bar: tqdm, echo: bool = False) -> None:
        self.bar = bar
        self.echo = echo

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        self.bar.total = num_rounds
        self.bar.n = row["round"]
        self.bar.refresh()
        if self.echo and not self.bar.disable:
            tqdm.write(progress_line(row, num_rounds))


def follow_metrics(
    path: Path, observer: RunObserver, num_rounds: int, stop: threading.Event
) -> None:
    """Report each new metrics.jsonl row of a run in another process (flwr run, a sweep
    worker) to an observer, until `stop` is set."""
    seen = 0
    while not stop.wait(0.5):
        if path.is_file():
            rows = read_metrics(path)
            for row in rows[seen:]:
                observer.round_finished(row, num_rounds)
            seen = max(seen, len(rows))
