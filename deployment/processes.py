"""Start and stop Flower's processes without leaving any behind (Linux).

Flower's app processes start sessions of their own and watch their parent only through a
`--parent-pid` flag, so stopping a tree means collecting it first, by parent links and by
that flag, then killing it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a Flower process may take to start listening. Healthy starts take seconds; on a
# 2-core machine busy building Docker images, a SuperLink's cold start once took over 30 s.
START_TIMEOUT_S = 120.0


def wait_for_port(host: str, port: int, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def listening_ports(pid: int) -> set[int]:
    """TCP ports listened on in the network namespace of process `pid` (its own view)."""
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_for_listen(pid: int, port: int, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until `port` listens in process `pid`'s network namespace, which can differ from
    ours (a process started with `ip netns exec`); fail early if the process has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _zombie(pid):
            raise RuntimeError(f"process {pid} exited before listening on port {port}")
        if port in listening_ports(pid):
            return
        time.sleep(0.2)
    raise TimeoutError(f"process {pid} does not listen on port {port} after {timeout:.0f} s")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
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


def declared_parent(cmd: str) -> int | None:
    """The pid a Flower process names with `--parent-pid N` (a SuperExec's ClientApp), if any."""
    args = cmd.split()
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--parent-pid" and value.isdigit():
            return int(value)
    return None


def process_tree(roots: set[int]) -> set[int]:
    """The roots and every process descending from them (by parent or --parent-pid)."""
    table = {pid: (ppid, declared_parent(cmd)) for pid, (ppid, cmd) in _processes().items()}
    tree = {pid for pid in roots if pid in table}
    while True:
        children = {
            pid
            for pid, (ppid, declared) in table.items()
            if pid not in tree and (ppid in tree or declared in tree)
        }
        if not children:
            return tree
        tree |= children


def kill_tree(roots: set[int], grace: float = 3.0) -> None:
    """SIGTERM the whole tree, then SIGKILL what is left after `grace` seconds."""
    tree = process_tree(roots)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if not any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in tree):
                return
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def pids_matching(marker: str) -> set[int]:
    return {pid for pid, (_, cmd) in _processes().items() if marker in cmd and pid != os.getpid()}


@contextmanager
def exit_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit inside the block, so that `with` blocks within it
    stop what they started, as on Ctrl-C (a `timeout` or a closed terminal otherwise left the
    local cluster's SuperLink and SuperNodes running); the previous handlers come back after."""

    def stop(signum: int, _frame: object) -> None:
        for sig in previous:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
