"""Run every (experiment, seed, method) of a sweep file, then write the results table and plots.

    python -m experiments.runner configs/sweeps/smoke.yaml --out outputs/sweeps/smoke
    python -m experiments.runner SWEEP.yaml --engine flower --skip-existing

Engines (the same ServerApp and ClientApp code, the same numbers for the same seed):
- `inprocess` (default): the Strategy drives the real ClientApps through `InProcessGrid`,
  in this process, one client after another; no Ray, no SuperLink. Fast on one GPU.
- `flower`: `flwr run . --stream` with the Ray simulation engine, one SuperNode per client,
  against a private local SuperLink (own FLWR_HOME and ports) that is killed after each run.

Each run writes <out>/<run name>/ (config.yaml, metrics.jsonl, summary.json, plus
sweep_run.json from the runner); a run that fails is recorded in <out>/sweep_status.json and
reported at the end, and the sweep goes on. The table and plots (experiments.report) are
written to <out> at the end.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.config import ExperimentConfig
from deployment.processes import kill_tree
from experiments.flower import flwr_command, private_flower, run_config_toml
from experiments.report import write_report
from experiments.sweep import Run, Sweep, SweepError, load_sweep, plan

ENGINES = ("inprocess", "flower")
ROUND_LINE = re.compile(r"\[round (\d+)/(\d+)\]")
RUN_INFO = "sweep_run.json"
STATUS = "sweep_status.json"
FLOWER_LOG = "flwr.log"
ERROR_FILE = "error.txt"

log = logging.getLogger("experiments")


class RunFailed(RuntimeError):
    """A run that ended without its summary.json."""


@dataclass
class Outcome:
    run: str
    status: str  # ok | skipped | failed
    seconds: float = 0.0
    error: str = ""


# ------------------------------------------------------------------- engines
@dataclass(frozen=True)
class Engine:
    """How runs are executed.

    `cpus_per_client` is Flower's `client-resources-num-cpus`; Ray then runs each ClientApp
    with OMP_NUM_THREADS=floor(cpus) (unless OMP_NUM_THREADS is set), and the in-process
    engine gives the ClientApp the same number of torch threads: float sums depend on the
    thread count, so this is what makes both engines give the same numbers.
    """

    name: str = "inprocess"
    cpus_per_client: float = 1.0
    federation_extra: str = ""  # engine flower: e.g. "client-resources-num-gpus=0.25"
    timeout: float | None = None  # engine flower: seconds per run

    def client_threads(self) -> int:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            return int(env)
        return max(math.floor(self.cpus_per_client), 1)

    def parallel_clients(self) -> int:
        """Clients that train at once, as Ray would schedule them: cores / threads each."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max((cores or os.cpu_count() or 1) // self.client_threads(), 1)

    def federation_config(self, num_clients: int) -> str:
        parts = [
            f"num-supernodes={num_clients}",
            f"client-resources-num-cpus={self.cpus_per_client:g}",
            self.federation_extra,
        ]
        return " ".join(p for p in parts if p)


class _RoundProgress(logging.Handler):
    """Feeds the server's `[round k/N]` log lines to a callback."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.on_line = on_line

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.on_line(record.getMessage())


class ThreadLimitedClientApp:
    """A ClientApp called with `threads` torch threads, as a Ray worker runs it."""

    def __init__(self, client_app: Any, threads: int) -> None:
        self.client_app = client_app
        self.threads = threads

    def __call__(self, message: Any, context: Any) -> Any:
        from server_app.inprocess import torch_threads

        with torch_threads(self.threads):
            return self.client_app(message, context)


def _forget_client_data() -> None:
    """Drop the ClientApp's per-process data memo (one entry per client, experiment, seed)."""
    with contextlib.suppress(Exception):
        from client_app import node

        node._client_data.cache_clear()
        node._on_device.cache_clear()


def run_inprocess(
    cfg: ExperimentConfig,
    run_config: dict[str, Any],
    on_line: Callable[[str], None],
    engine: Engine = Engine(),
) -> None:
    """The ServerApp's `run_experiment` against in-process ClientApps: one after another
    (`InProcessGrid`, cfg.engine loop) or trained together per architecture (`BatchedGrid`)."""
    from client_app.app import app as client_app
    from server_app.app import run_experiment
    from server_app.inprocess import BatchedGrid, InProcessGrid
    from server_app.strategy import logger as server_logger

    handler = _RoundProgress(on_line)
    server_logger.addHandler(handler)
    try:
        app = ThreadLimitedClientApp(client_app, engine.client_threads())
        grid_class = BatchedGrid if cfg.engine == "batched" else InProcessGrid
        grid = grid_class.simulation(app, int(cfg.data.num_clients), run_config)
        if isinstance(grid, BatchedGrid):
            grid.train_threads = engine.client_threads()
            grid.workers = engine.parallel_clients()
        run_experiment(grid, cfg, run_id=cfg.server.run_name)
    finally:
        server_logger.removeHandler(handler)


def run_flower(
    cfg: ExperimentConfig,
    run_config: dict[str, Any],
    on_line: Callable[[str], None],
    run_dir: Path,
    flower_home: Path,
    engine: Engine = Engine("flower"),
) -> None:
    """`flwr run` with the simulation engine; its output goes to <run_dir>/flwr.log.

    Relative paths in the run config (data.source, ...) mean what they mean in-process:
    `flwr run` is started from this working directory, and so is the SuperLink it starts.
    """
    toml_path = run_dir / "run_config.toml"
    toml_path.write_text(run_config_toml(run_config))
    cmd = flwr_command(str(toml_path), engine.federation_config(int(cfg.data.num_clients)))
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
        if engine.timeout:
            timer = threading.Timer(engine.timeout, kill_tree, args=({process.pid},))
            timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                out.flush()
                on_line(line)
            returncode = process.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if process.poll() is None:
                kill_tree({process.pid})
                process.wait()
    if returncode != 0:
        tail = "".join((run_dir / FLOWER_LOG).read_text().splitlines(keepends=True)[-30:])
        raise RunFailed(f"flwr run exited with status {returncode}; end of its log:\n{tail}")


# -------------------------------------------------------------------- sweep
def _round_bar_updater(bar: tqdm, echo: bool = False) -> Callable[[str], None]:
    """Moves the round bar on each `[round k/N]` line (and prints the line when `echo`)."""

    def on_line(text: str) -> None:
        match = ROUND_LINE.search(text)
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            bar.total = total
            bar.n = done
            bar.refresh()
            if echo and not bar.disable:
                tqdm.write(text.rstrip())

    return on_line


def output_dir(sweep: Sweep, out: str | Path | None) -> Path:
    """--out, or outputs/sweeps/<sweep name> under the working directory."""
    chosen = Path(out) if out is not None else Path("outputs", "sweeps", str(sweep.name))
    return chosen.expanduser().resolve()


def run_sweep(
    sweep_path: str | Path,
    out: str | Path | None = None,
    *,
    engine: Engine | str = "inprocess",
    skip_existing: bool = False,
    only: str | None = None,
    progress: bool = True,
) -> list[Outcome]:
    """Run a sweep file's runs into `out`, then write the report there. Returns each run's
    outcome; failures do not stop the sweep."""
    engine = Engine(engine) if isinstance(engine, str) else engine
    if engine.name not in ENGINES:
        raise SweepError(f"unknown engine {engine.name!r}; choose one of {ENGINES}")
    sweep = load_sweep(sweep_path)
    out = output_dir(sweep, out)
    runs = plan(sweep, out)  # every configuration is checked before anything runs
    if only:
        runs = [r for r in runs if re.search(only, r[0].name)]
    out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    previous_data = None
    with logging_redirect_tqdm(loggers=[logging.getLogger("flwr"), log]):
        bar = tqdm(runs, desc=f"sweep {sweep.name}", unit="run", disable=not progress)
        for run, cfg, run_config in bar:
            bar.set_postfix_str(run.name)
            run_dir = out / run.name
            if skip_existing and (run_dir / "summary.json").is_file():
                outcomes.append(Outcome(run.name, "skipped"))
                continue
            if engine.name == "inprocess" and previous_data not in (None, (run.label, run.seed)):
                _forget_client_data()
            previous_data = (run.label, run.seed)
            outcomes.append(_one_run(run, cfg, run_config, run_dir, engine, out, progress))
            _write_status(out, sweep.name, engine.name, outcomes)
        bar.close()
    _write_status(out, sweep.name, engine.name, outcomes)
    write_report(out)
    return outcomes


def _one_run(
    run: Run,
    cfg: ExperimentConfig,
    run_config: dict[str, Any],
    run_dir: Path,
    engine: Engine,
    out: Path,
    progress: bool = True,
) -> Outcome:
    if run_dir.exists():  # a rerun starts clean (metrics.jsonl is appended to)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    info = {**run.describe(), "engine": engine.name, "run_config": run_config}
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    started = time.perf_counter()
    desc = f"  {run.name}"
    with tqdm(total=cfg.rounds, desc=desc, unit="round", leave=False, disable=not progress) as bar:
        # in-process, Flower's logger prints the round lines; flwr run's go to flwr.log
        on_line = _round_bar_updater(bar, echo=engine.name == "flower")
        try:
            if engine.name == "inprocess":
                run_inprocess(cfg, run_config, on_line, engine)
            else:
                run_flower(cfg, run_config, on_line, run_dir, out / ".flower" / "home", engine)
            if not (run_dir / "summary.json").is_file():
                raise RunFailed("the run ended without writing summary.json")
        except KeyboardInterrupt:
            raise
        except Exception as err:
            seconds = time.perf_counter() - started
            (run_dir / ERROR_FILE).write_text(traceback.format_exc())
            message = f"{type(err).__name__}: {err}"
            log.error("run %s failed after %.0f s: %s", run.name, seconds, message)
            return Outcome(run.name, "failed", seconds, message)
    return Outcome(run.name, "ok", time.perf_counter() - started)


def _write_status(out: Path, name: str | None, engine: str, outcomes: list[Outcome]) -> None:
    status = {
        "sweep": name,
        "engine": engine,
        "runs": [o.__dict__ for o in outcomes],
    }
    (out / STATUS).write_text(json.dumps(status, indent=2) + "\n")


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.runner", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep", help="sweep YAML file (see configs/sweeps/)")
    parser.add_argument("--out", help="output folder (default: outputs/sweeps/<sweep name>)")
    parser.add_argument("--engine", choices=ENGINES, default="inprocess")
    parser.add_argument(
        "--skip-existing", action="store_true", help="skip runs whose summary.json exists"
    )
    parser.add_argument("--only", help="run only the runs whose name matches this regex")
    parser.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="CPUs per client: Flower's client-resources-num-cpus, and the ClientApp's torch "
        "threads in-process (the same on both engines, so that they give the same numbers)",
    )
    parser.add_argument(
        "--federation-config",
        default="",
        help="engine flower: more federation config, e.g. 'client-resources-num-gpus=0.25' "
        "(num-supernodes is data.num_clients)",
    )
    parser.add_argument("--timeout", type=float, help="engine flower: seconds per run")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    args = parser.parse_args(argv)
    if not log.handlers:  # the runner's own messages; Flower's logger has its own handler
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        if args.dry_run:
            sweep = load_sweep(args.sweep)
            for run, cfg, _ in plan(sweep, output_dir(sweep, args.out)):
                print(f"{run.name}: {cfg.data.num_clients} clients, {cfg.rounds} rounds")
            return 0
        outcomes = run_sweep(
            args.sweep,
            args.out,
            engine=Engine(args.engine, args.cpus_per_client, args.federation_config, args.timeout),
            skip_existing=args.skip_existing,
            only=args.only,
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
