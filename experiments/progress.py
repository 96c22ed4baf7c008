"""Progress bars for runs: moved by a run's observer in this process, or by following the
metrics.jsonl that a run in another process writes."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from server_app.events import RunObserver, progress_line
from server_app.outputs import parse_metrics


def progress_bar(enabled: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; on a log file or pipe none (its carriage returns and cursor
    moves garble a log: tqdm's disable=None), where a RoundBar given `plain` writes a line per
    round instead."""
    return tqdm(disable=None if enabled else True, **kwargs)


class RoundBar(RunObserver):
    """Moves a progress bar as the run's rounds end (and prints each round when `echo`).

    Its rate and time left count only the rounds it saw run: a run that continues from its
    checkpoint at round k reports k + 1 first, and the bar starts at k (counted from 0, a
    resumed run's rate would be its checkpoint's rounds over one round's time)."""

    def __init__(self, bar: tqdm, echo: bool = False, plain: str | None = None) -> None:
        self.bar = bar
        self.echo = echo
        self.plain = plain  # the run's name: with the bar off, a line per round names it
        self.started = False
        self.since = time.monotonic()

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        self.bar.total = num_rounds
        if not self.started:
            self.started = True
            self.bar.initial = max(row["round"] - 1, 0)
        self.bar.n = row["round"]
        self.bar.refresh()
        if self.plain and self.bar.disable:
            minutes = (time.monotonic() - self.since) / 60
            print(f"{self.plain}: round {row['round']}/{num_rounds} ({minutes:.1f} min since "
                  "this process started it)", file=sys.stderr, flush=True)  # fmt: skip
        if self.echo:
            tqdm.write(progress_line(row, num_rounds))


def follow_metrics(
    path: Path,
    observer: RunObserver,
    num_rounds: int,
    stop: threading.Event,
    interval: float = 0.5,
) -> None:
    """Report each new metrics.jsonl row of a run in another process (flwr run, a sweep
    worker) to an observer, until `stop` is set. Rows already there are an earlier attempt's.
    A run continuing from its checkpoint rewrites the file with the checkpoint's rows and
    appends its new rounds; a new round's row differs from the earlier attempt's (its times
    do), so the rows from the first that differs from the last look on are new."""
    known = _rows(path)
    while not stop.wait(interval):
        rows = _rows(path)
        same = next(
            (i for i, (row, old) in enumerate(zip(rows, known, strict=False)) if row != old),
            min(len(rows), len(known)),
        )
        for row in rows[same:]:
            observer.round_finished(row, num_rounds)
        known = rows


def _rows(path: Path) -> list[dict[str, Any]]:
    """The rows whose line is complete (one being written is read at the next look)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return parse_metrics(text[: text.rfind("\n") + 1])
