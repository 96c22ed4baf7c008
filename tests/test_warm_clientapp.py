"""Warm ClientApp processes (deployment/warm_clientapp.py): the process the SuperExec starts
must behave as the ClientApp it stands for (its argv, environment, directory, streams, exit
status and signals), and without the warm process it starts cold, as Flower would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployment.warm_clientapp import SOCKET_ENV, write_shim

# A warm server whose "ClientApp" reports what it was given, sleeps or fails, by its argv.
SERVER = r"""
import json, os, sys, time
from pathlib import Path
from deployment.warm_clientapp import STARTED_ENV, WarmServer

def entry():
    mode = sys.argv[1]
    if mode == "report":
        print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "site": os.environ.get("SITE"),
                          "started": os.environ.get(STARTED_ENV), "ppid": os.getppid()}))
        print("to stderr", file=sys.stderr)
        sys.exit(3)
    if mode == "app":  # as Flower loads a FAB: its directory first on sys.path, then import
        sys.path.insert(0, sys.argv[2])
        import client_app.process
        print(client_app.process.__file__)
        sys.exit(0)
    if mode == "sleep":
        print("sleeping", os.getpid(), flush=True)
        time.sleep(60)
    raise RuntimeError("boom")

server = WarmServer(Path(sys.argv[1]), entry=entry)
print("ready", flush=True)
while True:
    server.serve_once(0.05)
"""


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """(server process, shim path, environment for the shim)."""
    root = tmp_path_factory.mktemp("warm")
    cold = root / "cold-clientapp"
    cold.write_text(f"#!{sys.executable}\nimport sys\nprint('cold', *sys.argv[1:])\nsys.exit(7)\n")
    cold.chmod(0o755)
    shim = write_shim(root, str(cold))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(root / "socket")], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout.readline().strip() == "ready"
    env = {**os.environ, SOCKET_ENV: str(root / "socket"), "SITE": "site-a"}
    yield server, shim, env
    server.kill()
    server.wait()


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False


def test_the_child_gets_the_callers_argv_environment_directory_streams_and_status(warm, tmp_path):
    server, shim, env = warm
    before = time.time()
    out = subprocess.run(
        [str(shim), "report", "--token", "t1"], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 3
    assert "to stderr" in out.stderr
    seen = json.loads(out.stdout)
    assert seen["argv"] == ["flwr-clientapp", "report", "--token", "t1"]
    assert seen["cwd"] == str(tmp_path)
    assert seen["site"] == "site-a"
    assert seen["ppid"] == server.pid  # forked by the warm process, not started cold
    assert before - 1 <= float(seen["started"]) <= time.time()  # when the caller started


def test_the_child_imports_the_app_from_the_shipped_fab_not_the_warm_processs_copy(warm, tmp_path):
    """The warm process has imported client_app (installed); a child must run the FAB's."""
    fab = tmp_path / "fab"
    (fab / "client_app").mkdir(parents=True)
    (fab / "client_app" / "__init__.py").write_text("")
    (fab / "client_app" / "process.py").write_text("")
    _, shim, env = warm
    out = subprocess.run([str(shim), "app", str(fab)], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(fab / "client_app" / "process.py")


def test_the_packages_forgotten_are_those_the_fab_ships():
    import tomllib

    from deployment.warm_clientapp import APP_PACKAGES

    root = Path(__file__).resolve().parents[1]
    app = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    shipped = {p.split("/")[0] for p in app["fab-include"] if p.endswith(".py")}
    assert set(APP_PACKAGES) == shipped


def test_a_failing_child_exits_1_with_its_traceback_and_the_server_serves_on(warm):
    _, shim, env = warm
    out = subprocess.run([str(shim), "fail"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "RuntimeError: boom" in out.stderr
    again = subprocess.run([str(shim), "report"], env=env, capture_output=True, timeout=60)
    assert again.returncode == 3


def test_a_signal_to_the_callers_process_reaches_the_child(warm):
    _, shim, env = warm
    caller = subprocess.Popen([str(shim), "sleep"], env=env, stdout=subprocess.PIPE, text=True)
    word, pid = caller.stdout.readline().split()
    assert word == "sleeping"
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=30) == 128 + signal.SIGTERM
    assert gone(int(pid))


def test_when_the_callers_process_dies_its_child_is_stopped(warm):
    _, shim, env = warm
    caller = subprocess.Popen([str(shim), "sleep"], env=env, stdout=subprocess.PIPE, text=True)
    _, pid = caller.stdout.readline().split()
    caller.kill()  # SIGKILL: nothing forwarded; the warm process sees the connection close
    caller.wait(timeout=30)
    assert gone(int(pid))


def test_without_a_warm_process_the_caller_starts_cold(warm, tmp_path):
    _, shim, env = warm
    env = {**env, SOCKET_ENV: str(tmp_path / "no-socket")}
    out = subprocess.run([str(shim), "--token", "t2"], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (7, "cold --token t2")
    env.pop(SOCKET_ENV)
    assert subprocess.run([str(shim)], env=env, capture_output=True).returncode == 7


def test_the_switch_runs_plain_flower_superexec(tmp_path):
    fake = tmp_path / "flower-superexec"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('plain', *sys.argv[1:])\n")
    fake.chmod(0o755)
    env = {**os.environ, "MH_PFEDHN_WARM_CLIENTAPP": "0",
           "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "deployment.warm_clientapp", "--insecure"], env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == "plain --insecure"


def test_flower_superexec_runs_with_the_warm_flwr_clientapp_first_on_its_path(tmp_path):
    """What the SuperExec would start is the shim, and through it Flower's real entry point."""
    fake = tmp_path / "flower-superexec"
    fake.write_text(
        f"#!{sys.executable}\nimport shutil, subprocess, sys\n"
        "print('found', shutil.which('flwr-clientapp'), *sys.argv[1:], flush=True)\n"
        "sys.exit(subprocess.run(['flwr-clientapp', '--help']).returncode)\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [sys.executable, "-m", "deployment.warm_clientapp", "--insecure"], env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    found = out.stdout.splitlines()[0].split()
    assert found[0] == "found" and "warm-clientapp-" in found[1] and found[2] == "--insecure"
    assert "--token" in out.stdout  # Flower's own flwr-clientapp usage, printed by the child


def test_a_process_that_connects_and_sends_nothing_does_not_hold_up_the_site(warm):
    """Before: the single-threaded server waited on such a connection forever, and no
    ClientApp of the site could start."""
    import socket

    _, shim, env = warm
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(env[SOCKET_ENV])
    try:
        done = subprocess.run([str(shim), "report"], env=env, capture_output=True, text=True,
                              timeout=30)  # fmt: skip
    finally:
        silent.close()
    assert done.returncode == 3 and json.loads(done.stdout.splitlines()[0])["site"] == "site-a"


def test_a_malformed_request_leaks_no_descriptor(tmp_path):
    """Before: the descriptors a non-JSON request passed stayed open in the warm process."""
    import socket

    from deployment.warm_clientapp import WarmServer

    server = WarmServer(tmp_path / "socket", entry=lambda: None)
    read, write = os.pipe()
    try:
        for payload in (b"not json", json.dumps({"argv": "x"}).encode()):
            before = len(os.listdir("/proc/self/fd"))
            client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            client.connect(str(tmp_path / "socket"))
            socket.send_fds(client, [payload], [read, write, read])
            server.serve_once(5)
            assert client.recv(64) == b""  # refused: closed without a child
            client.close()
            assert len(os.listdir("/proc/self/fd")) == before
            assert not server.children
    finally:
        os.close(read)
        os.close(write)
        server.stop()
