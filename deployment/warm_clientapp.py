"""Start ClientApp processes warm: forked from one that has already imported torch and Flower.

Flower's SuperExec starts a fresh `flwr-clientapp` process for every message, and on a small
machine its imports (torch, Flower) cost more than the training: about 3 s alone on an idle
core, 8-13 s when three sites start theirs at once on 2 cores. `mh-pfedhn-superexec` runs
`flower-superexec` with the same arguments, but puts a `flwr-clientapp` first on its PATH
that asks this process to fork a child which has those modules imported already. The child
runs Flower's own `flwr-clientapp` entry point with the argv, environment, working directory
and standard streams of the process the SuperExec started, and that process exits with the
child's status (signals to it reach the child; if it dies, so does the child).

    mh-pfedhn-superexec --insecure --runtime-api-address supernode-0:9094

Only third-party modules are preloaded: every child forgets the app's own packages (this
process imports one of them) before Flower loads the app, so the app is imported from the FAB
that `flwr run` shipped, never from the version installed at the site.
MH_PFEDHN_WARM_CLIENTAPP=0 runs plain `flower-superexec` instead.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import suppress
from importlib.metadata import entry_points
from pathlib import Path

from client_app.process import STARTED_ENV  # when the SuperExec's process started (epoch s)

PRELOAD = ("numpy", "torch", "yaml", "pydantic", "flwr.clientapp", "flwr.supernode.cli",
           "flwr.supernode.runtime.run_clientapp")  # fmt: skip
#: The app's top-level packages, as the FAB ships them (pyproject.toml's fab-include).
APP_PACKAGES = ("common", "server_app", "client_app")
SOCKET_ENV = "MH_PFEDHN_WARM_SOCKET"
REQUEST_TIMEOUT = 2.0  # seconds a connected process has to send its request
SWITCH_ENV = "MH_PFEDHN_WARM_CLIENTAPP"

# The `flwr-clientapp` the SuperExec finds first. Only the standard library, started with -S
# (no site-packages): it costs ~30 ms, not the seconds of a cold import.
SHIM = """#!{python} -S
import json, os, signal, socket, sys, time
started = time.time()
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(os.environ[{socket_env!r}])
except (KeyError, OSError):  # no warm process: start cold, as Flower would
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
request = {{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "started": started}}
socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
reply = conn.recv(64)
if not reply:
    sys.exit(1)
child = int(reply)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda number, frame: os.kill(child, number))
status = conn.recv(64)
sys.exit(int(status) if status else 1)
"""


def write_shim(directory: Path, real: str) -> Path:
    path = directory / "flwr-clientapp"
    path.write_text(SHIM.format(python=sys.executable, socket_env=SOCKET_ENV, real=real))
    path.chmod(0o755)
    return path


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # a child imports what it needs itself
            print(f"warm clientapp: cannot preload {name}: {exc}", file=sys.stderr)


def forget_app_modules(packages: tuple[str, ...] = APP_PACKAGES) -> None:
    """Drop the app's modules, so that the child imports them from the FAB's directory that
    Flower puts first on sys.path, not from this process's (site-installed) import."""
    for name in [n for n in sys.modules if n.split(".", 1)[0] in packages]:
        del sys.modules[name]
    importlib.invalidate_caches()  # the FAB's directory may be newer than this process


def flower_clientapp() -> object:
    """Flower's own `flwr-clientapp` console script, as the SuperExec would have run it."""
    (entry,) = entry_points(group="console_scripts", name="flwr-clientapp")
    return entry.load()()


def run_child(conn: socket.socket, request: dict, fds: list[int], entry: Callable) -> None:
    """In the forked child: become the process the SuperExec started, run `entry`."""
    code = 1
    try:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[STARTED_ENV] = repr(request["started"])
        os.environ.pop(SOCKET_ENV, None)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and "torch" in sys.modules:  # torch read the warm process's
            sys.modules["torch"].set_num_threads(int(threads))
        sys.argv = ["flwr-clientapp", *request["argv"]]
        forget_app_modules()
        entry()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it on the SuperExec's stream, then exit
        traceback.print_exc()
    finally:
        with suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class WarmServer:
    """Forks a child per request and reports its exit status; single-threaded, so forking
    is safe (no lock can be held by a thread that the child would not have)."""

    def __init__(self, path: Path, entry: Callable = flower_clientapp) -> None:
        self.entry = entry
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.children: dict[int, socket.socket] = {}

    def serve_once(self, timeout: float) -> None:
        waiting = [self.listener, *self.children.values()]
        readable, _, _ = select.select(waiting, [], [], timeout)
        for conn in readable:
            if conn is self.listener:
                self._accept()
            else:  # the SuperExec's process is gone (it never sends twice): stop its child
                pid = next(p for p, c in self.children.items() if c is conn)
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        self.reap()

    def _accept(self) -> None:
        """One request: a process that connects and sends nothing within REQUEST_TIMEOUT is
        dropped (it must not hold up every ClientApp start at this site), and a malformed
        request is refused with every descriptor it passed closed."""
        conn, _ = self.listener.accept()
        conn.settimeout(REQUEST_TIMEOUT)
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(data)
            if not isinstance(request, dict) or len(fds) != 3 or not _well_formed(request):
                raise ValueError("not a request of the shim")
        except (OSError, ValueError):
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)
            conn.close()
            return
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for other in self.children.values():
                other.close()
            run_child(conn, request, fds, self.entry)
        for fd in fds:
            os.close(fd)
        with suppress(OSError):
            conn.send(str(pid).encode())
        self.children[pid] = conn

    def reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = self.children.pop(pid)
                with suppress(OSError):
                    code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
                    conn.send(str(code if code >= 0 else 128 - code).encode())
                conn.close()

    def stop(self) -> None:
        for pid in self.children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.listener.close()


def _well_formed(request: dict) -> bool:
    return (isinstance(request.get("argv"), list) and isinstance(request.get("env"), dict)
            and isinstance(request.get("cwd"), str)
            and isinstance(request.get("started"), int | float))  # fmt: skip


def find(command: str) -> str | None:
    """On PATH, else beside this interpreter (a virtual environment that is not activated)."""
    return shutil.which(command) or shutil.which(command, path=str(Path(sys.executable).parent))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    superexec, real = find("flower-superexec"), find("flwr-clientapp")
    if superexec is None:
        raise SystemExit("mh-pfedhn-superexec: flower-superexec is not installed")
    if os.environ.get(SWITCH_ENV, "1") == "0" or real is None:
        os.execv(superexec, [superexec, *args])
    workdir = Path(tempfile.mkdtemp(prefix="warm-clientapp-"))
    server = WarmServer(workdir / "socket")
    write_shim(workdir, real)
    env = {**os.environ, SOCKET_ENV: str(workdir / "socket"),
           "PATH": f"{workdir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    child = subprocess.Popen([superexec, *args], env=env)
    stopping = []

    def forward(number: int, _frame: object) -> None:
        stopping.append(number)
        with suppress(ProcessLookupError):
            child.send_signal(number)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    preload()  # while the SuperExec starts; requests queue on the socket meanwhile
    try:
        while child.poll() is None:
            server.serve_once(0.1)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return child.returncode if not stopping else 0


if __name__ == "__main__":
    raise SystemExit(main())
