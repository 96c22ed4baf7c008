"""Progress bars of long runs: the time left of a run continuing from its checkpoint, and
following the metrics.jsonl of a run in another process."""

import io
import json
import threading
from pathlib import Path

from tqdm import tqdm

from experiments import progress
from experiments.progress import RoundBar, follow_metrics
from server_app.events import RunObserver


def _bar(now: list[float]) -> tqdm:
    bar = tqdm(total=20, file=io.StringIO(), mininterval=0)
    bar._time = lambda: now[0]  # a clock the test moves
    bar.start_t = now[0]
    return bar


def test_a_resumed_runs_time_left_counts_only_the_rounds_it_ran() -> None:
    """Checkpoint at round 15 of 20, round 16 took 100 s: 4 rounds left are 400 s, not the
    38 s a bar counting the checkpoint's rounds as run in those 100 s would say."""
    now = [0.0]
    bar = _bar(now)
    observer = RoundBar(bar)
    now[0] = 100.0
    observer.round_finished({"round": 16}, 20)
    assert "16/20 [01:40<06:40" in tqdm.format_meter(**bar.format_dict)
    now[0] = 200.0
    observer.round_finished({"round": 17}, 20)
    assert "17/20 [03:20<05:00" in tqdm.format_meter(**bar.format_dict)


def test_a_fresh_runs_bar_counts_from_round_zero() -> None:
    now = [0.0]
    bar = _bar(now)
    observer = RoundBar(bar)
    observer.round_finished({"round": 0}, 20)  # the initial evaluation
    now[0] = 50.0
    observer.round_finished({"round": 1}, 20)
    assert "1/20 [00:50<15:50" in tqdm.format_meter(**bar.format_dict)


class _Rounds(RunObserver):
    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.seen = threading.Event()

    def round_finished(self, row, num_rounds) -> None:
        self.rounds.append(row["round"])
        self.seen.set()


def _write(path: Path, rounds: range, mode: str = "w", end: str = "", attempt: int = 1) -> None:
    rows = ({"round": r, "seconds": attempt} for r in rounds)
    with path.open(mode) as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows) + end)


def _follow(
    path: Path, observer: RunObserver, monkeypatch
) -> tuple[threading.Event, threading.Thread]:
    """Start following; return once the follower has read what the file holds now."""
    looked = threading.Event()
    rows = progress._rows

    def look(path: Path) -> list[dict]:
        found = rows(path)
        looked.set()
        return found

    monkeypatch.setattr(progress, "_rows", look)
    stop = threading.Event()
    thread = threading.Thread(
        target=follow_metrics, args=(path, observer, 20, stop, 0.01), daemon=True
    )
    thread.start()
    assert looked.wait(5)
    return stop, thread


def _wait_for(observer: _Rounds, rounds: list[int]) -> None:
    for _ in range(500):
        if observer.rounds == rounds:
            return
        observer.seen.wait(0.01)
        observer.seen.clear()
    raise AssertionError(f"followed {observer.rounds}, expected {rounds}")


def test_following_a_resumed_run_reports_its_new_rounds_only(tmp_path: Path, monkeypatch) -> None:
    """An earlier attempt logged rounds 0-19 (checkpoint at 15): the resumed run rewrites the
    file with rounds 0-15 and appends 16, 17 (half a line of 18 being written), whichever of
    these the follower sees first."""
    path = tmp_path / "metrics.jsonl"
    _write(path, range(20))
    observer = _Rounds()
    stop, thread = _follow(path, observer, monkeypatch)
    _write(path.with_suffix(".tmp"), range(16))
    path.with_suffix(".tmp").replace(path)  # the recorder's atomic rewrite
    _write(path, range(16, 18), mode="a", end='{"round": 18, "sec', attempt=2)
    _wait_for(observer, [16, 17])
    with path.open("a") as f:
        f.write('onds": 2}\n')
    _wait_for(observer, [16, 17, 18])
    stop.set()
    thread.join()


def test_following_a_run_whose_file_appears_later(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "metrics.jsonl"
    observer = _Rounds()
    stop, thread = _follow(path, observer, monkeypatch)
    _write(path, range(3))
    _wait_for(observer, [0, 1, 2])
    stop.set()
    thread.join()


def test_a_log_file_gets_plain_lines_per_round_not_a_bar(capsys) -> None:
    """A sweep's output redirected to a file: the bars' carriage returns and cursor moves
    garbled it; there the bar is off and each round is one line naming the run."""
    bar = progress.progress_bar(True, total=3, desc="  run-a", unit="round")  # stderr: a file
    assert bar.disable
    observer = RoundBar(bar, plain="run-a")
    for k in range(2):
        observer.round_finished({"round": k}, 3)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert [line.split(" (")[0] for line in err.splitlines()] == ["run-a: round 0/3",
                                                                  "run-a: round 1/3"]  # fmt: skip

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not progress.progress_bar(True, total=3, file=Terminal()).disable
    assert progress.progress_bar(False, total=3, file=Terminal()).disable  # progress off
