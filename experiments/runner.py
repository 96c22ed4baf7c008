"""Run every (experiment, seed, method) of a sweep file, then write the results table and plots.

    python -m experiments.runner configs/sweeps/smoke.yaml --out outputs/sweeps/smoke
    python -m experiments.runner SWEEP.yaml --runtime flower

Runtimes (the same ServerApp and ClientApp code, the same numbers for the same seed):
- `inprocess` (default): the Strategy drives the real ClientApps in this process
  (simulation/), one client after another or, with `engine: batched`, several at once;
  no Ray, no SuperLink. Fast on one GPU.
- `flower`: `flwr run . --stream` with the Ray simulation engine, one SuperNode per client,
  against a private local SuperLink (own FLWR_HOME and ports) that is killed after each run.

Each run writes <out>/<run name>/ (config.yaml, metrics.jsonl, summary.json, checkpoint.pt,
client_state/, plus sweep_run.json from the runner). Starting a sweep again skips the runs
that are done, continues every unfinished one from its last checkpoint (with the clients'
state as it was then, so the result is bit-identical to an uninterrupted run) and starts the
others afresh; `--restart` starts everything afresh. A sweep checkpoints every
`server.checkpoint_every` = 10 rounds unless it says otherwise (`--drop-checkpoints` deletes a
run's once it has all its rounds). A run that fails is recorded in
<out>/sweep_status.json and reported at the end, and the sweep goes on. The table and plots
(experiments.report) are written to <out> at the end. `--workers N` runs N in-process runs at
once, each in a process of its own (experiments.workers), with the same numbers; their output
goes to <out>/logs/<run>.log. `--set KEY=VALUE` overrides a setting of every run (e.g.
`rounds=20` for a first pass that the sweep file's rounds later extend).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.contrib.logging import logging_redirect_tqdm

from client_app.data import forget_loaded_data
from common.config import (
    ExperimentConfig,
    defining_settings,
    resolve_config,
    run_config_toml,
    settings_changed,
)
from common.files import write_text_atomically
from deployment.processes import kill_tree
from experiments.cli import add_set_option
from experiments.flower import flwr_command, private_flower
from experiments.progress import RoundBar, follow_metrics, progress_bar
from experiments.report import write_report
from experiments.sweep import Run, Sweep, SweepError, load_sweep, plan, unused_settings
from experiments.workers import Job, run_in_workers
from server_app.checkpoint import CHECKPOINT_NAME
from server_app.events import RunObserver
from server_app.run import checkpoint_writer
from simulation.run import run_inprocess

PlannedRun = tuple[Run, ExperimentConfig, dict]  # experiments.sweep.plan's items
RUNTIMES = ("inprocess", "flower")
RUN_INFO = "sweep_run.json"
STATUS = "sweep_status.json"
FLOWER_LOG = "flwr.log"
ERROR_FILE = "error.txt"
WORKER_LOGS = "logs"  # --workers: each run's output, <out>/logs/<run>.log
SUMMARY = "summary.json"

log = logging.getLogger("experiments")


class RunFailed(RuntimeError):
    """A run that ended without its summary.json."""


@dataclass
class Outcome:
    run: str
    status: str  # ok | skipped | failed
    seconds: float = 0.0
    error: str = ""
    resumed: bool = False  # continued from its checkpoint


# ------------------------------------------------------------------ runtimes
@dataclass(frozen=True)
class Runtime:
    """Where and how runs are executed.

    `cpus_per_client` is Flower's `client-resources-num-cpus`; Ray then runs each ClientApp
    with OMP_NUM_THREADS=floor(cpus) (unless OMP_NUM_THREADS is set), and the in-process
    runtime gives the ClientApp the same number of torch threads: float sums depend on the
    thread count, so this is what makes both runtimes give the same numbers.
    """

    name: str = "inprocess"
    cpus_per_client: float = 1.0
    federation_extra: str = ""  # flower: e.g. "client-resources-num-gpus=0.25"
    timeout: float | None = None  # flower: seconds per run
    workers: int = 1  # inprocess: runs at once, each in its own process (experiments.workers)
    drop_checkpoints: bool = False  # delete a finished run's checkpoint (--drop-checkpoints)

    def client_threads(self) -> int:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            return int(env)
        return max(math.floor(self.cpus_per_client), 1)

    def parallel_clients(self) -> int:
        """Clients that train at once, as Ray would schedule them: cores / threads each (the
        cores shared among the runs that run at once)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        share = (cores or os.cpu_count() or 1) // max(self.workers, 1)
        return max(share // self.client_threads(), 1)

    def federation_config(self, num_clients: int) -> str:
        parts = [
            f"num-supernodes={num_clients}",
            f"client-resources-num-cpus={self.cpus_per_client:g}",
            self.federation_extra,
        ]
        return " ".join(p for p in parts if p)


def run_flower(
    cfg: ExperimentConfig,
    run_config: dict[str, Any],
    observer: RunObserver,
    run_dir: Path,
    flower_home: Path,
    runtime: Runtime = Runtime("flower"),
) -> None:
    """`flwr run` with the simulation engine; its output goes to <run_dir>/flwr.log.

    Relative paths in the run config (data.source, ...) mean what they mean in-process:
    `flwr run` is started from this working directory, and so is the SuperLink it starts.
    """
    toml_path = run_dir / "run_config.toml"
    toml_path.write_text(run_config_toml(run_config))
    cmd = flwr_command(str(toml_path), runtime.federation_config(int(cfg.data.num_clients)))
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_metrics,
        args=(run_dir / "metrics.jsonl", observer, cfg.rounds, stop),
        daemon=True,
    )
    follower.start()
    with private_flower(flower_home) as env, (run_dir / FLOWER_LOG).open("w") as out:
        process = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timer = None
        if runtime.timeout:
            timer = threading.Timer(runtime.timeout, kill_tree, args=({process.pid},))
            timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                out.flush()
            returncode = process.wait()
        finally:
            stop.set()
            if timer is not None:
                timer.cancel()
            if process.poll() is None:
                kill_tree({process.pid})
                process.wait()
    if returncode != 0:
        tail = "".join((run_dir / FLOWER_LOG).read_text().splitlines(keepends=True)[-30:])
        raise RunFailed(f"flwr run exited with status {returncode}; end of its log:\n{tail}")


# -------------------------------------------------------------------- sweep
def output_dir(sweep: Sweep, out: str | Path | None) -> Path:
    """--out, or outputs/sweeps/<sweep name> under the working directory."""
    chosen = Path(out) if out is not None else Path("outputs", "sweeps", str(sweep.name))
    return chosen.expanduser().resolve()


def finished_rounds(run_dir: Path) -> int | None:
    """The rounds a run's summary.json reports (None: no summary)."""
    try:
        return int(json.loads((run_dir / SUMMARY).read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_sweep(
    sweep_path: str | Path,
    out: str | Path | None = None,
    *,
    runtime: Runtime | str = "inprocess",
    restart: bool = False,
    only: str | None = None,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> list[Outcome]:
    """Run a sweep file's runs into `out`, then write the report there. Returns each run's
    outcome; failures do not stop the sweep. `settings` override every run's (`--set`)."""
    runtime = Runtime(runtime) if isinstance(runtime, str) else runtime
    if runtime.name not in RUNTIMES:
        raise SweepError(f"unknown runtime {runtime.name!r}; choose one of {RUNTIMES}")
    sweep = load_sweep(sweep_path)
    out = output_dir(sweep, out)
    runs = selected(planned(sweep, out, settings), only)  # every configuration checked first
    out.mkdir(parents=True, exist_ok=True)
    if runtime.workers > 1:
        return _run_in_workers(sweep, runs, out, runtime, restart, progress)
    outcomes: list[Outcome] = []
    previous_data = None
    with logging_redirect_tqdm(loggers=[logging.getLogger("flwr"), log]):
        bar = progress_bar(progress, iterable=runs, desc=f"sweep {sweep.name}", unit="run")
        for run, cfg, run_config in bar:
            bar.set_postfix_str(run.name)
            run_dir = out / run.name
            if _is_finished(run_dir, cfg, restart):
                outcomes.append(Outcome(run.name, "skipped"))
                continue
            if runtime.name == "inprocess" and previous_data not in (None, (run.label, run.seed)):
                forget_loaded_data()
            previous_data = (run.label, run.seed)
            outcomes.append(
                _one_run(run, cfg, run_config, run_dir, runtime, out, progress, restart)
            )
            _write_status(out, sweep.name, runtime.name, outcomes)
        bar.close()
    _write_status(out, sweep.name, runtime.name, outcomes)
    write_report(out)
    return outcomes


def selected(runs: list[PlannedRun], only: str | None) -> list[PlannedRun]:
    """The runs whose name matches the regex `only` (all without one); a filter that is not
    a regex or matches nothing is refused, naming the runs there are."""
    if not only:
        return runs
    try:
        pattern = re.compile(only)
    except re.error as err:
        raise SweepError(f"--only {only!r} is not a regular expression: {err}") from None
    chosen = [r for r in runs if pattern.search(r[0].name)]
    if not chosen:
        names = ", ".join(r[0].name for r in runs[:6]) + (", ..." if len(runs) > 6 else "")
        raise SweepError(f"--only {only!r} matches none of the sweep's {len(runs)} runs ({names})")
    return chosen


def state_of(run_dir: Path, cfg: ExperimentConfig, restart: bool = False) -> str:
    """What running the sweep would do with this run, for --dry-run (as _one_run decides)."""
    if restart:
        return "starts afresh (--restart)"
    if changed := _changed_settings(run_dir, cfg):
        return (f"would be refused: its folder holds it made with other settings "
                f"({'; '.join(changed)}; --restart starts it afresh)")  # fmt: skip
    done = finished_rounds(run_dir)
    if done is not None and done >= cfg.rounds:
        return "done"
    if (run_dir / CHECKPOINT_NAME).is_file():
        ended = "" if done is None else f" (it ended after round {done})"
        return f"continues from its checkpoint{ended}"
    return (
        "starts afresh (its folder's earlier attempt is cleared)" if run_dir.exists() else "to run"
    )


def _is_finished(run_dir: Path, cfg: ExperimentConfig, restart: bool) -> bool:
    """Done with all its rounds and the settings it is planned with (else it is run, or
    refused by _one_run when its settings changed)."""
    return state_of(run_dir, cfg, restart) == "done"


def _changed_settings(run_dir: Path, cfg: ExperimentConfig) -> list[str]:
    """The defining settings (docs/concepts/round.md) that the planned run changes against
    the run folder's own config.yaml; none when the folder has no readable one."""
    try:
        before = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return settings_changed(defining_settings(before), cfg) if isinstance(before, dict) else []


def _run_in_workers(
    sweep: Sweep,
    runs: list[tuple[Run, ExperimentConfig, dict[str, Any]]],
    out: Path,
    runtime: Runtime,
    restart: bool,
    progress: bool,
) -> list[Outcome]:
    """run_sweep with `runtime.workers` runs at a time, each in a process of its own."""
    if runtime.name != "inprocess":
        raise SweepError("--workers runs in-process runs at once; the flower runtime runs one "
                         "at a time (each against its own SuperLink)")  # fmt: skip
    skipped = [
        Outcome(r.name, "skipped") for r, cfg, _ in runs if _is_finished(out / r.name, cfg, restart)
    ]
    done = {o.run for o in skipped}
    jobs = [
        Job(run.name, cfg.rounds, out / run.name, out / WORKER_LOGS / f"{run.name}.log", _one_run,
            (run, cfg, run_config, out / run.name, runtime, out, False, restart))
        for run, cfg, run_config in runs if run.name not in done
    ]  # fmt: skip
    order = [r.name for r, _, _ in runs]

    def in_order(outcomes: list[Outcome]) -> list[Outcome]:
        return sorted(skipped + outcomes, key=lambda o: order.index(o.run))

    def failed(job: Job, reason: str) -> Outcome:
        log.error("run %s failed: %s", job.name, reason)
        return Outcome(job.name, "failed", error=reason)

    outcomes = run_in_workers(
        jobs, runtime.workers, failed, progress=progress,
        finished=lambda so_far: _write_status(out, sweep.name, runtime.name, in_order(so_far)),
    )  # fmt: skip
    outcomes = in_order(outcomes)
    _write_status(out, sweep.name, runtime.name, outcomes)
    write_report(out)
    return outcomes


def _prepare(
    run: Run, run_config: dict[str, Any], run_dir: Path, runtime: Runtime, restart: bool
) -> bool:
    """Make the run directory ready; True when the run continues from its checkpoint. The
    run's description is (re)written either way: a run extended to more rounds says so."""
    info = {**run.describe(), "runtime": runtime.name, "run_config": dict(run_config)}
    resumed = not restart and (run_dir / CHECKPOINT_NAME).is_file()
    if resumed:
        run_config["server.resume"] = str(run_dir)
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # an earlier attempt's, if any
    else:
        if run_dir.exists():  # a fresh start (the server refuses a folder holding a run)
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return resumed


def _one_run(
    run: Run,
    cfg: ExperimentConfig,
    run_config: dict[str, Any],
    run_dir: Path,
    runtime: Runtime,
    out: Path,
    progress: bool = True,
    restart: bool = False,
) -> Outcome:
    if not restart and (changed := _changed_settings(run_dir, cfg)):
        message = (
            f"{run_dir} holds this run made with other settings (changed: {'; '.join(changed)}); "
            "--restart starts it afresh, or choose another --out"
        )
        log.error("run %s refused: %s", run.name, message)
        return Outcome(run.name, "failed", 0.0, message)
    run_config = dict(run_config)
    resumed = _prepare(run, run_config, run_dir, runtime, restart)
    if resumed:
        cfg = resolve_config(run.experiment, run_config)
        log.info("run %s continues from its checkpoint", run.name)
    started = time.perf_counter()
    desc = f"  {run.name}"
    with progress_bar(progress, total=cfg.rounds, desc=desc, unit="round", leave=False) as bar:
        observer = RoundBar(bar, echo=progress and runtime.name == "flower")
        try:
            if runtime.name == "inprocess":
                run_inprocess(
                    cfg,
                    run_config,
                    threads_per_client=runtime.client_threads(),
                    parallel_clients=runtime.parallel_clients(),
                    observers=[observer],
                )
            else:
                run_flower(cfg, run_config, observer, run_dir, out / ".flower" / "home", runtime)
            if (finished_rounds(run_dir) or 0) < cfg.rounds:
                raise RunFailed(f"the run ended without a summary.json of its {cfg.rounds} rounds")
            if runtime.drop_checkpoints:  # disk: a heterogeneous MH-pFedHN one is 2.9 GB
                checkpoint_writer(cfg, run_dir).remove()
        except KeyboardInterrupt:
            raise
        except Exception as err:
            seconds = time.perf_counter() - started
            (run_dir / ERROR_FILE).write_text(traceback.format_exc())
            message = f"{type(err).__name__}: {err}"
            log.error("run %s failed after %.0f s: %s", run.name, seconds, message)
            return Outcome(run.name, "failed", seconds, message, resumed)
    return Outcome(run.name, "ok", time.perf_counter() - started, resumed=resumed)


def planned(sweep: Sweep, out: Path, settings: Mapping[str, Any] | None) -> list[PlannedRun]:
    """experiments.sweep.plan, warning of `--set` keys that no run's method reads."""
    runs = plan(sweep, out, settings)
    for key in unused_settings(settings or {}, [run for run, _, _ in runs]):
        log.warning("--set %s: no run of this sweep is of the method whose setting it is; "
                    "it changes nothing", key)  # fmt: skip
    return runs


def _write_status(out: Path, name: str | None, runtime: str, outcomes: list[Outcome]) -> None:
    """sweep_status.json: this invocation's outcomes (each naming its sweep), then those of
    earlier invocations into the same folder for the other runs, so that a second sweep or an
    --only subset run into the same --out does not hide the other runs' failures. Its top-level
    `sweep` and `runtime` are the latest invocation's; an unreadable earlier file is replaced."""
    try:
        earlier = json.loads((out / STATUS).read_text())["runs"]
        earlier = [r for r in earlier if isinstance(r, dict) and isinstance(r.get("run"), str)]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = []
    now = [{**o.__dict__, "sweep": name} for o in outcomes]
    names = {o.run for o in outcomes}
    runs = now + [r for r in earlier if r["run"] not in names]
    status = {"sweep": name, "runtime": runtime, "runs": runs}
    write_text_atomically(out / STATUS, json.dumps(status, indent=2) + "\n")  # read next time


# ---------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.runner", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep", help="sweep YAML file (see configs/sweeps/)")
    parser.add_argument("--out", help="output folder (default: outputs/sweeps/<sweep name>)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="inprocess")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start every run afresh (default: skip finished runs, continue unfinished ones "
        "from their checkpoints)",
    )
    parser.add_argument("--only", help="run only the runs whose name matches this regex")
    parser.add_argument(
        "--drop-checkpoints",
        action="store_true",
        help="delete each run's checkpoint once it has all its rounds, to save disk; more "
        "rounds for it later run it again from round 0",
    )
    parser.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="CPUs per client: Flower's client-resources-num-cpus, and the ClientApp's torch "
        "threads in-process (the same in both runtimes, so that they give the same numbers)",
    )
    parser.add_argument(
        "--federation-config",
        default="",
        help="runtime flower: more federation config, e.g. 'client-resources-num-gpus=0.25' "
        "(num-supernodes is data.num_clients)",
    )
    parser.add_argument("--timeout", type=float, help="runtime flower: seconds per run")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="runtime inprocess: runs at once, each in its own process (same numbers as one "
        "at a time; give each run its threads: workers x --cpus-per-client <= cores)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    add_set_option(
        parser,
        help="a setting for every run, over the sweep file's (value read as YAML), e.g. "
        "rounds=20 for a first pass that the file's rounds later extend; repeatable",
    )
    args = parser.parse_args(argv)
    settings = dict(args.set)
    if not log.handlers:  # the runner's own messages; Flower's logger has its own handler
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        if args.dry_run:
            sweep = load_sweep(args.sweep)
            out = output_dir(sweep, args.out)
            for run, cfg, _ in selected(planned(sweep, out, settings), args.only):
                print(f"{run.name}: {cfg.data.num_clients} clients, {cfg.rounds} rounds, "
                      f"{state_of(out / run.name, cfg, args.restart)}")  # fmt: skip
            return 0
        outcomes = run_sweep(
            args.sweep,
            args.out,
            runtime=Runtime(
                args.runtime,
                args.cpus_per_client,
                args.federation_config,
                args.timeout,
                args.workers,
                args.drop_checkpoints,
            ),
            restart=args.restart,
            only=args.only,
            settings=settings,
        )
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    print(f"runs: {counts['ok']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    out = output_dir(load_sweep(args.sweep), args.out)
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'accuracy.png'}")
    for outcome in failed:
        print(f"FAILED {outcome.run}: {outcome.error.splitlines()[0]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
