"""A run's output directory: resolved config, metrics.jsonl (one line per round) and
summary.json (the plot, accuracy.png, is server_app/run_plot.py's).

Lines are appended and flushed as each round ends, so a crashed run keeps what it measured.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from common.config import ConfigError, ExperimentConfig, to_yaml
from common.files import write_text_atomically
from server_app.events import RunObserver


def json_line(row: Any) -> str:
    """A row as strict JSON: a number that is not finite (a loss with nothing to average) is
    null, never the bare NaN or Infinity that JSON readers refuse."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(row), allow_nan=False)


def _claim(directory: Path) -> bool:
    """Make `directory` a new run's (private: its checkpoint holds every client's model);
    False if a run has it (its metrics.jsonl exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    try:
        (directory / "metrics.jsonl").open("x").close()
    except FileExistsError:
        return False
    return True


def _taken(directory: Path) -> str:
    if (directory / "checkpoint.pt").is_file():
        how = f"continue it with server.resume={str(directory)!r}, or "
    else:
        how = "it has no checkpoint to continue from: "
    return (f"{directory} holds a run already (metrics.jsonl): {how}choose another "
            "server.run_name, or remove the folder")  # fmt: skip


class RunRecorder(RunObserver):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.metrics_path = directory / "metrics.jsonl"

    @classmethod
    def create(cls, cfg: ExperimentConfig, run_id: int | str = "local") -> RunRecorder:
        """outputs/<name>-<time>-run<id>/ (-2, -3... if a run of the same second has it)
        unless server.run_name is set; a named folder that holds a run is refused (its rows
        would mix with the new run's). The folder is claimed by creating metrics.jsonl, so
        two runs started together cannot both take it."""
        root = Path(cfg.server.output_root).expanduser().resolve()
        if cfg.server.run_name != "auto":
            directory = root / cfg.server.run_name
            if not _claim(directory):
                raise ConfigError(_taken(directory))
        else:
            stem = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
            names = (stem if n == 1 else f"{stem}-{n}" for n in itertools.count(1))
            directory = next(root / name for name in names if _claim(root / name))
        write_text_atomically(directory / "config.yaml", to_yaml(cfg))
        return cls(directory)

    @classmethod
    def resume(
        cls, directory: Path, cfg: ExperimentConfig, history: list[dict[str, Any]]
    ) -> RunRecorder:
        """Continue a run's directory: metrics.jsonl becomes exactly the checkpoint's rounds,
        and a summary of fewer rounds (a run extended) goes until the run writes its own."""
        recorder = cls(directory)
        (directory / "summary.json").unlink(missing_ok=True)
        lines = "".join(json_line(row) + "\n" for row in history)
        write_text_atomically(recorder.metrics_path, lines)
        write_text_atomically(directory / "config.yaml", to_yaml(cfg))
        return recorder

    def round_finished(self, row: dict[str, Any], num_rounds: int) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json_line(row) + "\n")
            f.flush()

    def run_finished(self, summary: dict[str, Any]) -> None:
        text = json.dumps(json.loads(json_line(summary)), indent=2)
        write_text_atomically(self.directory / "summary.json", text + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return parse_metrics(Path(path).read_text())


def parse_metrics(text: str, *, up_to_malformed: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl text; a malformed line is a ValueError naming its number,
    or with `up_to_malformed` the end of the rows (a running run's last line may be half
    written)."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                if up_to_malformed:
                    break
                raise ValueError(f"line {number}: {error}") from error
    return rows
