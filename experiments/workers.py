"""Several runs of a sweep at once, each in a process of its own
(`python -m experiments.runner SWEEP --workers N`).

A run's numbers do not depend on what runs beside it: every process trains with the runtime's
thread count, as the run would alone, and starts from nothing (no data or model shared), so a
sweep gives the same metrics with any number of workers. Each run's output goes to its own log
file (the runner's: <out>/logs/<run>.log); a worker that dies (killed, out of memory) fails
its own run only.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from deployment.processes import kill_tree
from experiments.progress import RoundBar, follow_metrics, progress_bar


@dataclass(frozen=True)
class Job:
    """One run: `call(*args)` in a worker returns its outcome (picklable, as the runner's)."""

    name: str
    rounds: int
    run_dir: Path  # where its metrics.jsonl appears (the progress bar follows it)
    log: Path  # its stdout and stderr
    call: Callable[..., Any]
    args: tuple


def _work(job: Job, sender: Connection) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with job.log.open("ab") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sender.send(job.call(*job.args))
    sender.close()


class _Progress:
    """A bar for one running job, moved by its metrics.jsonl (written by the other process)."""

    def __init__(self, job: Job, slot: int, enabled: bool) -> None:
        self.slot = slot
        self.bar = progress_bar(enabled, total=job.rounds, desc=f"  {job.name}", unit="round",
                                position=slot, leave=False)  # fmt: skip
        self.stop = threading.Event()
        observer = RoundBar(self.bar, plain=job.name if enabled else None)
        self.thread = threading.Thread(
            target=follow_metrics,
            args=(job.run_dir / "metrics.jsonl", observer, job.rounds, self.stop),
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.close()


def run_in_workers(
    jobs: Sequence[Job],
    workers: int,
    failed: Callable[[Job, str], Any],
    *,
    progress: bool = True,
    finished: Callable[[list[Any]], None] | None = None,
) -> list[Any]:
    """Run the jobs, `workers` at a time, in the order given; return their outcomes in that
    order. `failed(job, reason)` makes the outcome of a worker that returned none;
    `finished(outcomes so far)` is called as each job ends."""
    context = multiprocessing.get_context("spawn")  # no state inherited from this process
    waiting = list(jobs)
    running: dict[Any, tuple[Job, Connection, _Progress]] = {}
    outcomes: dict[str, Any] = {}
    slots = list(range(workers, 0, -1))
    overall = progress_bar(progress, total=len(jobs), desc="runs", unit="run", position=0)
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                job = waiting.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_work, args=(job, sender), name=job.name)
                process.start()
                sender.close()
                running[process] = (job, receiver, _Progress(job, slots.pop(), progress))
            wait([p.sentinel for p in running])
            for process in [p for p in running if not p.is_alive()]:
                job, receiver, bar = running.pop(process)
                bar.close()
                slots.append(bar.slot)
                if receiver.poll():
                    outcomes[job.name] = receiver.recv()
                else:
                    outcomes[job.name] = failed(
                        job, f"its worker exited with code {process.exitcode} and no outcome "
                        f"(see {job.log})",
                    )  # fmt: skip
                receiver.close()
                overall.update(1)
                if finished is not None:
                    finished([outcomes[j.name] for j in jobs if j.name in outcomes])
    except BaseException:
        kill_tree({p.pid for p in running if p.pid is not None})
        raise
    finally:
        overall.close()
    return [outcomes[j.name] for j in jobs]
