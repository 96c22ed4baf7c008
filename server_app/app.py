"""The ServerApp: resolve the experiment from Flower's run config, then run it."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import config_from_run_config
from server_app.round_loop import logger
from server_app.run import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    if cfg.engine != "loop":
        logger.info("engine=%s applies to in-process runs; Flower runs each ClientApp itself",
                    cfg.engine)  # fmt: skip
    run_experiment(grid, cfg, context.run_id)
