"""The ServerApp: resolve the experiment, build the hypernetwork server, run the Strategy."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ExperimentConfig, config_from_run_config
from server_app.outputs import RunRecorder
from server_app.state import HypernetworkServer, HypernetworkSettings
from server_app.strategy import MHpFedHN, logger
from server_app.strategy_gd import MHpFedHNGD

app = ServerApp()


def build_server(cfg: ExperimentConfig) -> HypernetworkServer:
    settings = HypernetworkSettings(**cfg.hypernetwork.model_dump(exclude={"device"}))
    return HypernetworkServer(settings, seed=cfg.seed, device=cfg.hypernetwork.device)


def run_experiment(grid: Grid, cfg: ExperimentConfig, run_id: int | str) -> MHpFedHN:
    """Everything a run does, for the ServerApp and for in-process runs alike."""
    recorder = RunRecorder.create(cfg, run_id=run_id)
    logger.info("outputs: %s", recorder.directory)
    strategy_class = MHpFedHNGD if cfg.uses_global_model else MHpFedHN
    strategy = strategy_class(build_server(cfg), cfg, recorder)
    strategy.start(grid)
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_experiment(grid, config_from_run_config(context.run_config), context.run_id)
