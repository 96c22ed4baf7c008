"""Run `flwr run` against a private local SuperLink and leave no process behind.

`flwr run` starts a detached SuperLink (its own session) on fixed ports and leaves it running;
tests give it private ports and FLWR_HOME, then kill its whole process group afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
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
        # flwr starts flower-superlink & co. by name: use this interpreter's scripts
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (ppid, cmdline)
    return table


def kill_tree(marker: str) -> list[int]:
    """SIGKILL every process whose command line has marker, and all their descendants.

    Flower's app processes start their own sessions and only watch their parent by
    `--parent-pid`, so the tree is collected first (by parent links and by that flag).
    """
    table = _processes()
    doomed = {pid for pid, (_, cmd) in table.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {
            pid
            for pid, (ppid, cmd) in table.items()
            if pid not in doomed
            and (ppid in doomed or any(f"--parent-pid {d}" in cmd for d in doomed))
        }
        grew = bool(children)
        doomed |= children
    for pid in doomed:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(doomed)


@contextmanager
def private_flower(flwr_home: Path):
    """Environment for flwr commands; on exit, the SuperLink it started and its children die."""
    env = flower_env(flwr_home)
    marker = f"--port {env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}"
    try:
        yield env
    finally:
        kill_tree(marker)
        time.sleep(0.5)


def flwr_run(env: dict[str, str], run_config: str, federation_config: str, timeout: float):
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
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
