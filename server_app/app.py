"""The ServerApp: resolve the experiment, build the hypernetwork server, run the Strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ExperimentConfig, config_from_run_config
from server_app.baselines import (
    FedAvgServer,
    FedAvgStrategy,
    LocalServer,
    LocalStrategy,
    PFedHNServer,
    PFedHNStrategy,
)
from server_app.checkpoint import CHECKPOINT_NAME, load_checkpoint
from server_app.outputs import RunRecorder
from server_app.state import HypernetworkServer, HypernetworkSettings
from server_app.strategy import MHpFedHN, logger
from server_app.strategy_gd import MHpFedHNGD

app = ServerApp()


STRATEGIES = {
    "mh_pfedhn": MHpFedHN,
    "mh_pfedhng": MHpFedHNGD,
    "mh_pfedhngd": MHpFedHNGD,
    "local": LocalStrategy,
    "fedavg": FedAvgStrategy,
    "pfedhn": PFedHNStrategy,
}


SERVERS = {
    "mh_pfedhn": HypernetworkServer,
    "mh_pfedhng": HypernetworkServer,
    "mh_pfedhngd": HypernetworkServer,
    "local": LocalServer,
    "fedavg": FedAvgServer,
    "pfedhn": PFedHNServer,
}


def build_server(cfg: ExperimentConfig):
    """The method's server state: the hypernetwork, or a baseline's."""
    settings = HypernetworkSettings(**cfg.hypernetwork.model_dump(exclude={"device"}))
    server_class = SERVERS[cfg.method]
    if server_class in (LocalServer, FedAvgServer):
        return server_class(settings, cfg.seed)
    return server_class(settings, seed=cfg.seed, device=cfg.hypernetwork.device)


def resume_server(cfg: ExperimentConfig) -> tuple[Any, int, list, RunRecorder]:
    """Load a run directory's checkpoint; the hypernetwork settings must not have changed."""
    directory = Path(cfg.server.resume).expanduser().resolve()
    server, completed, history = load_checkpoint(
        directory / CHECKPOINT_NAME, SERVERS[cfg.method], cfg.hypernetwork.device
    )
    expected = HypernetworkSettings(**cfg.hypernetwork.model_dump(exclude={"device"}))
    if server.settings != expected or server.seed != cfg.seed:
        raise ValueError(
            f"{directory} was made with seed {server.seed} and {server.settings}; the "
            f"configuration now says seed {cfg.seed} and {expected}: resume with the same ones"
        )
    return server, completed, history, RunRecorder.resume(directory, cfg, history)


def run_experiment(grid: Grid, cfg: ExperimentConfig, run_id: int | str) -> MHpFedHN:
    """Everything a run does, for the ServerApp and for in-process runs alike."""
    strategy_class = STRATEGIES[cfg.method]
    if cfg.server.resume:
        server, completed, history, recorder = resume_server(cfg)
        logger.info("resuming %s after round %d", recorder.directory, completed)
    else:
        server, completed, history = build_server(cfg), -1, []
        recorder = RunRecorder.create(cfg, run_id=run_id)
    logger.info("outputs: %s", recorder.directory)
    strategy = strategy_class(server, cfg, recorder)
    strategy.completed_round, strategy.history = completed, history
    strategy.start(grid)
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    if cfg.engine != "loop":
        logger.info("engine=%s applies to in-process runs; Flower runs each ClientApp itself",
                    cfg.engine)  # fmt: skip
    run_experiment(grid, cfg, context.run_id)
