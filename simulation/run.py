"""One run in this process: the ServerApp's `run_experiment` against in-process ClientApps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from client_app.app import app as project_app
from common.config import ExperimentConfig
from server_app.events import RunObserver
from server_app.round_loop import RoundLoop
from server_app.run import run_experiment
from simulation.batched_grid import BatchedGrid
from simulation.grid import InProcessGrid, torch_threads


class ThreadLimitedClientApp:
    """A ClientApp called with `threads` torch threads, as a Ray worker runs it."""

    def __init__(self, client_app: Any, threads: int) -> None:
        self.client_app = client_app
        self.threads = threads

    def __call__(self, message: Any, context: Any) -> Any:
        with torch_threads(self.threads):
            return self.client_app(message, context)


def run_inprocess(
    cfg: ExperimentConfig,
    run_config: Mapping[str, Any],
    *,
    threads_per_client: int = 1,
    parallel_clients: int = 1,
    observers: Sequence[RunObserver] = (),
    client_app: Any = project_app,
) -> RoundLoop:
    """Clients one after another (`engine: loop`) or trained together per architecture
    (`engine: batched`, `parallel_clients` at a time on the CPU). The ClientApp gets
    `threads_per_client` torch threads, as Flower's `client-resources-num-cpus` gives it;
    `client_app` is this project's unless given (a scripted or wrapped one, in experiments)."""
    if cfg.engine == "batched" and client_app is not project_app:
        raise ValueError(
            "engine: batched trains through this project's client methods, so a given "
            "ClientApp would never see the train messages: use engine: loop with it"
        )
    app = ThreadLimitedClientApp(client_app, threads_per_client)
    num_clients = int(cfg.data.num_clients)
    if cfg.engine == "batched":
        grid: InProcessGrid = BatchedGrid.simulation(
            app,
            num_clients,
            run_config,
            train_threads=threads_per_client,
            workers=parallel_clients,
        )
    else:
        grid = InProcessGrid.simulation(app, num_clients, run_config)
    return run_experiment(grid, cfg, run_id=cfg.server.run_name, observers=observers)
