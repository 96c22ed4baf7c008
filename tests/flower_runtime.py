"""Run `flwr run` against a private local SuperLink and leave no process behind.

`flwr run` starts a detached SuperLink (its own session) on fixed ports and leaves it running;
tests give it private ports and FLWR_HOME, then kill its whole process group afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        RAY_DEDUP_LOGS="0",
    )
    return env


def _session_ids_of(marker: str) -> set[int]:
    """Session ids of processes whose command line contains marker (Linux /proc)."""
    sessions = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmdline:
                sessions.add(os.getsid(int(entry.name)))
        except (OSError, ProcessLookupError):
            continue
    return sessions


def _kill_sessions(sessions: set[int]) -> None:
    for sid in sessions:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == sid:
                        os.kill(int(entry.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    continue


@contextmanager
def private_flower(flwr_home: Path):
    """Environment for flwr commands; on exit, the SuperLink it started and its children die."""
    env = flower_env(flwr_home)
    marker = f"--port {env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}"
    try:
        yield env
    finally:
        _kill_sessions(_session_ids_of(marker) - {os.getsid(0)})
        time.sleep(0.5)


def flwr_run(env: dict[str, str], run_config: str, federation_config: str, timeout: float):
    cmd = [
        "flwr",
        "run",
        str(ROOT),
        "--stream",
        "--federation-config",
        federation_config,
        "--run-config",
        run_config,
    ]
    return subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
