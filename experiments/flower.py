"""Run `flwr run` against a private local SuperLink and leave no process behind.

`flwr run` starts a detached SuperLink (its own session) on fixed ports and leaves it running;
we give it private ports and FLWR_HOME, then kill its whole process tree afterwards.
Used by the experiment runner (`--runtime flower`) and by the tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deployment.local_cluster import flower_environment
from deployment.processes import free_port, kill_tree, pids_matching

ROOT = Path(__file__).resolve().parents[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Flower's environment with private ports for the local SuperLink `flwr run` starts."""
    env = flower_environment(flwr_home)
    env.update(
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        RAY_DEDUP_LOGS="0",
    )
    return env


@contextmanager
def private_flower(flwr_home: Path) -> Iterator[dict[str, str]]:
    """Environment for flwr commands; on exit, the SuperLink it started and its children die."""
    env = flower_env(flwr_home)
    marker = f"--port {env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}"
    try:
        yield env
    finally:
        kill_tree(pids_matching(marker))
        time.sleep(0.5)


def flwr_command(run_config: str, federation_config: str, app_dir: Path = ROOT) -> list[str]:
    """`flwr run <app> --stream ...`; run_config is `k=v ...` (TOML values) or a .toml path."""
    return [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(app_dir),
        "--stream",
        "--federation-config",
        federation_config,
        "--run-config",
        run_config,
    ]


def flwr_run(
    env: dict[str, str], run_config: str, federation_config: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        flwr_command(run_config, federation_config),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
