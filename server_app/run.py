"""Everything a run does, for the ServerApp and for in-process runs alike: build (or resume)
the method's server state and Strategy from its registry entry, then run the rounds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from common.config import ConfigError, ExperimentConfig, settings_changed
from server_app.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointWriter,
    checkpoint_key,
    load_checkpoint,
)
from server_app.events import ConsoleProgress, RunObserver
from server_app.outputs import RunRecorder
from server_app.round_loop import ResumePoint, RoundLoop
from server_app.run_plot import PlotWhenFinished
from server_app.server_state import ServerState
from server_app.tracking import trackers

logger = logging.getLogger("flwr.mh_pfedhn")


def build_state(cfg: ExperimentConfig) -> ServerState:
    """A fresh server state of the configured method."""
    return cfg.method_spec.strategy_class().build_state(cfg)


def build_strategy(
    cfg: ExperimentConfig, state: ServerState | None = None, **kwargs: Any
) -> RoundLoop:
    """The configured method's Strategy over `state` (a fresh one by default); kwargs are
    RoundLoop's (observers, checkpoints, resume)."""
    state = build_state(cfg) if state is None else state
    return cfg.method_spec.strategy_class()(state, cfg, **kwargs)


def checkpoint_writer(cfg: ExperimentConfig, directory: Path) -> CheckpointWriter:
    """The run's checkpoints; simulated clients' state (client.state_dir) travels with them."""
    state_dir = Path(cfg.client.state_dir).expanduser().resolve() if cfg.client.state_dir else None
    key = checkpoint_key(cfg.server.checkpoint_key_file)
    return CheckpointWriter(directory / CHECKPOINT_NAME, state_dir, key)


def resume_state(cfg: ExperimentConfig) -> tuple[ServerState, ResumePoint, RunRecorder]:
    """Load a run directory's checkpoint; the settings that define the run must not change."""
    directory = Path(cfg.server.resume).expanduser().resolve()
    checkpoint = load_checkpoint(
        directory / CHECKPOINT_NAME,
        cfg.method_spec.strategy_class().state_class,
        cfg.hypernetwork.device,
        key=checkpoint_key(cfg.server.checkpoint_key_file),
        memory_budget=cfg.server.memory_budget_gb,
        client_memory=cfg.server.client_memory_gb,
    )
    changed = settings_changed(checkpoint.settings, cfg)
    if changed:
        raise ConfigError(
            f"{directory} was made with other settings; resume with the same ones "
            f"(changed: {'; '.join(changed)})"
        )
    if checkpoint.round >= cfg.rounds:
        raise ConfigError(
            f"{directory} is checkpointed after round {checkpoint.round}; rounds={cfg.rounds} "
            f"leaves nothing to run: set rounds above {checkpoint.round} to continue it"
        )
    checkpoint_writer(cfg, directory).restore_client_state(checkpoint.round)
    if not cfg.client.state_dir:
        logger.warning(
            "resuming without client.state_dir: simulated clients (no node config state-dir) "
            "start without their secrets and state, and are refused as new holders of their "
            "keys; deployed sites keep theirs in their own state-dir"
        )
    point = ResumePoint(checkpoint.round, checkpoint.history, checkpoint.strategy)
    return checkpoint.server, point, RunRecorder.resume(directory, cfg, checkpoint.history)


def run_experiment(
    grid: Grid,
    cfg: ExperimentConfig,
    run_id: int | str,
    observers: Sequence[RunObserver] = (),
) -> RoundLoop:
    if cfg.server.resume:
        state, resume, recorder = resume_state(cfg)
        logger.info("resuming %s after round %d", recorder.directory, resume.completed_round)
    else:
        state, resume = build_state(cfg), None
        recorder = RunRecorder.create(cfg, run_id=run_id)
    logger.info("outputs: %s", recorder.directory)
    strategy = build_strategy(
        cfg,
        state,
        observers=[
            recorder,
            PlotWhenFinished(recorder.directory),  # before the trackers, which upload the plot
            ConsoleProgress(recorder.directory),
            *trackers(cfg, recorder.directory),
            *observers,
        ],
        checkpoints=checkpoint_writer(cfg, recorder.directory),
        resume=resume,
    )
    strategy.start(grid)
    return strategy
