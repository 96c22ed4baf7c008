"""docker/compose.yml for real, locked as shipped: a Docker engine, Flower's images and the
gateway's nginx (local stand-ins where they cannot be pulled: docker/standin/build.sh),
credentials made by deployment/credentials.py, the sites' keys registered by the operator's
`flwr`, three sites on MNIST, `flwr run`, a site restarted, and what a site cannot reach.

Skipped, with the reason, where Docker cannot run here. Starts dockerd itself if none runs
(data in /tmp/mh-pfedhn-docker, stopped afterwards) and removes every container, network and
volume it made, also when a check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployment.credentials import make_credentials
from deployment.topology import (
    COMPOSE_CREDENTIALS,
    GATEWAY_PORT,
    IMAGE_USER,
    SUPERLINK_PORT,
    SUPERNODE_PORT,
    Node,
    services,
    site_address,
)
from server_app.outputs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKER_HOME = Path("/tmp/mh-pfedhn-docker")  # dockerd's data when this test starts it
APP_IMAGE = "mh-pfedhn:latest"
MODELS = ["lenet", "mlp", "lenet"]  # small ones: the compose file's are for CIFAR-10 on GPUs
RESTARTED = 2  # the site that is restarted
MESSAGE_LOG = "/state/received.jsonl"  # in the site's state volume

pytestmark = pytest.mark.slow


def _missing_tool() -> str | None:
    if os.geteuid() != 0:
        return "needs root (dockerd, debootstrap, chroot)"
    for tool in ("docker", "debootstrap", "gcc", "nm", "readelf", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install docker.io docker-compose debootstrap)"
    if _compose_command() is None:
        return "neither docker-compose nor `docker compose` found (apt-get install docker-compose)"
    return None


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    version = subprocess.run(["docker", "compose", "version"], capture_output=True)
    return ["docker", "compose"] if version.returncode == 0 else None


def _engine_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def docker_engine():
    """A running Docker engine: the one there is, else a dockerd of our own (stopped after)."""
    reason = _missing_tool()
    if reason:
        pytest.skip(reason)
    if _engine_up():
        yield
        return
    if shutil.which("dockerd") is None:
        pytest.skip("no Docker engine runs, and no dockerd (apt-get install docker.io)")
    DOCKER_HOME.mkdir(parents=True, exist_ok=True)
    log = DOCKER_HOME / "dockerd.log"
    daemon = subprocess.Popen(
        ["dockerd", "--data-root", str(DOCKER_HOME / "data"), "--exec-root",
         str(DOCKER_HOME / "exec"), "--pidfile", str(DOCKER_HOME / "dockerd.pid"),
         "--bridge", "none"],  # no default bridge: containers get internal networks only
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _engine_up():
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dockerd did not start: {log.read_text()[-1500:]}")
            time.sleep(1)
        yield
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


@pytest.fixture(scope="module")
def images(docker_engine):
    """Flower's images (stand-ins unless real ones are there) and the app image, built now."""
    build = subprocess.run(
        ["bash", str(ROOT / "docker" / "standin" / "build.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if build.returncode != 0:
        pytest.skip(f"stand-in images could not be built: {(build.stdout + build.stderr)[-2000:]}")
    app = subprocess.run(
        ["docker", "build", "--network", "none", "-f", "docker/Dockerfile", "-t", APP_IMAGE, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert app.returncode == 0, (app.stdout + app.stderr)[-3000:]


class Compose:
    """One compose project: docker/compose.yml + this test's override (small models on MNIST,
    this test's credentials instead of docker/secrets)."""

    def __init__(self, workdir: Path, name: str, data: Path):
        secrets = workdir / "secrets"
        make_credentials(secrets, len(MODELS), ["superlink"], ["gateway"])
        uid = int(IMAGE_USER.split(":")[0])
        for path in secrets.iterdir():  # the images' user reads them (0600)
            os.chown(path, uid, -1)
        override = workdir / f"{name}.override.yml"
        override.write_text(json.dumps(_override(data, secrets), indent=1))  # JSON is YAML
        self.files = [ROOT / "docker" / "compose.yml", override]
        self.name = f"mh-pfedhn-test-{name}-{os.getpid()}"
        self.log = workdir / f"{name}.log"

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [*_compose_command(), "-p", self.name]
        for path in self.files:
            cmd += ["-f", str(path)]
        started = time.monotonic()
        done = subprocess.run(
            [*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        with self.log.open("a") as log:
            took = time.monotonic() - started
            log.write(f"$ {' '.join(args)}  # {took:.0f} s\n{done.stdout}{done.stderr}\n")
        return done

    def check(self, *args: str, timeout: float = 300) -> str:
        done = self(*args, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)}:\n{(done.stdout + done.stderr)[-3000:]}"
        return done.stdout

    def python(self, service: str, code: str) -> subprocess.CompletedProcess:
        return self("exec", "-T", service, "python", "-c", code)

    def wait_for(self, service: str, port: int, timeout: float = 90) -> None:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
        deadline = time.monotonic() + timeout
        while self.python(service, probe).returncode != 0:
            assert time.monotonic() < deadline, self("logs", service).stdout[-3000:]
            time.sleep(1)

    def start_locked(self) -> None:
        """As docker/compose.yml's header says: the SuperLink side, the operator registers
        every site's key, then the sites."""
        self.check("up", "-d", "--no-build", "superlink", "serverapp", "gateway")
        self.wait_for("superlink", SUPERLINK_PORT)
        for index in range(len(MODELS)):
            out = self.check("run", "--rm", "-T", "flwr", "supernode", "register",
                             f"/keys/site-{index}.pub", timeout=300)  # fmt: skip
            assert "registered successfully" in out, out
        self.check("up", "-d", "--no-build")

    def flwr_run(self, run_config: str) -> None:
        done = self("run", "--rm", "-T", "flwr", "run", ".", "--stream", "--run-config",
                    run_config, timeout=900)  # fmt: skip
        logs = self("logs", "--tail", "40").stdout
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + logs[-4000:]

    def read(self, service: str, path: str) -> str:
        done = self("exec", "-T", service, "cat", path)
        return done.stdout if done.returncode == 0 else ""

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=300)


def _override(data: Path, secrets: Path) -> dict:
    """The compose file's services, but small models on MNIST from `data`, a message log for
    the site that is restarted, and every ./secrets/ file from `secrets`."""
    import yaml

    nodes = [Node(i, 3, model, f"site-{i}", "npz:/data/mnist.npz", "/state")
             for i, model in enumerate(MODELS)]  # fmt: skip
    shipped = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
    out: dict[str, dict] = {}
    sites = {f"supernode-{n.index}": site_address(n.index) for n in nodes}
    made = services(nodes, credentials=COMPOSE_CREDENTIALS,
                    host_of=lambda name: sites.get(name, name),
                    bind_host=lambda name: sites.get(name, "0.0.0.0"))  # fmt: skip
    for service in made:
        if service.name.startswith("supernode-"):
            command = service.argv[1:]
            if service.name == f"supernode-{RESTARTED}":
                command[-1] += f' message-log="{MESSAGE_LOG}"'
            out[service.name] = {"command": command}
    for name, service in shipped["services"].items():
        mounts = [v.replace("./secrets/", f"{secrets}/") for v in service.get("volumes", [])
                  if v.startswith("./secrets/")]  # fmt: skip
        if name.startswith("clientapp-"):
            mounts.append(f"{data}:/data:ro")
        if mounts:
            out.setdefault(name, {})["volumes"] = mounts
    files = {k: {"file": v["file"].replace("./secrets/", f"{secrets}/")}
             for k, v in shipped["secrets"].items()}  # fmt: skip
    return {"services": out, "secrets": files}


def run_config(rounds: int, **extra: str) -> str:
    """A parallel round (round 3's train vector is round 2's evaluation vector, which the
    restarted site must receive again; under one_by_one it would also hold earlier steps)."""
    pairs = {
        "hypernetwork.schedule": '"parallel_sequential"',
        "data.fraction": "0.05",
        "client.epochs": "1",
        "rounds": str(rounds),
        "server.min_nodes": "3",
        "server.run_name": '"compose"',
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def metrics(compose: Compose, workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    path.write_text(compose.read("serverapp", "/app/outputs/compose/metrics.jsonl"))
    return read_metrics(path)


def assert_two_rounds_learned(rows: list[dict]) -> None:
    assert [r["round"] for r in rows] == [0, 1, 2], rows
    last = rows[-1]
    assert last["clients_trained"] == 3 and last["clients_evaluated"] == 3 and not last["rejected"]
    assert set(last["client_accuracy"]) == {"site-0", "site-1", "site-2"}
    assert last["accuracy"] > rows[0]["accuracy"]


def message_log(compose: Compose) -> list[dict]:
    text = compose.read(f"clientapp-{RESTARTED}", MESSAGE_LOG)
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def data(mnist_npz, tmp_path) -> Path:
    folder = tmp_path / "data"  # mounted at /data, as ../data is in compose.yml
    folder.mkdir()
    shutil.copy(mnist_npz, folder / "mnist.npz")
    folder.chmod(0o755)
    return folder


def test_compose_runs_two_rounds_and_a_restarted_site_gets_its_own_embeddings(
    images, data, tmp_path
):
    compose = Compose(tmp_path, "locked", data)
    try:
        compose.start_locked()
        compose.flwr_run(run_config(rounds=2))
        assert_two_rounds_learned(metrics(compose, tmp_path))
        before = message_log(compose)[-1]
        assert before["round"] == 2, before

        # the site's containers go and come back: a new Flower node id, the same client key
        site = [f"supernode-{RESTARTED}", f"clientapp-{RESTARTED}"]
        compose.check("rm", "--stop", "--force", *site)
        compose.check("up", "-d", "--no-build", *site)
        compose.flwr_run(run_config(rounds=3, **{"server.resume": '"outputs/compose"'}))
        rows = metrics(compose, tmp_path)
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        assert rows[-1]["clients_trained"] == 3
        after = next(e for e in message_log(compose) if e["round"] == 3)
        assert after["type"] == "train" and after["sha256"] == before["sha256"]
    finally:
        compose.down()


def test_compose_keeps_each_site_to_itself(images, data, tmp_path):
    """What a site's containers can reach, locked: a ClientApp only its own SuperNode (not
    another site's Runtime API, not the SuperLink, not the gateway); a SuperNode the gateway,
    which answers the Control API with 403, but no other SuperNode's Runtime API; every
    container runs as the images' user, and none holds the CA key."""
    compose = Compose(tmp_path, "sites", data)
    try:
        compose.start_locked()

        def reaches(service: str, host: str, port: int, wait: float = 0.0) -> bool:
            code = f"import socket; socket.create_connection(({host!r}, {port}), 3)"
            deadline = time.monotonic() + wait
            while compose.python(service, code).returncode != 0:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(1)
            return True

        # once every site is up (its SuperNode listening), what each container reaches
        assert reaches("clientapp-1", site_address(1), SUPERNODE_PORT, wait=120)  # its own
        assert reaches("clientapp-0", site_address(0), SUPERNODE_PORT, wait=120)
        assert not reaches("clientapp-1", site_address(0), SUPERNODE_PORT)
        assert not reaches("clientapp-1", "superlink", SUPERLINK_PORT)
        assert not reaches("clientapp-1", "gateway", GATEWAY_PORT)
        assert not reaches("supernode-1", site_address(0), SUPERNODE_PORT)
        assert not reaches("supernode-1", "superlink", SUPERLINK_PORT)
        assert reaches("supernode-1", "gateway", GATEWAY_PORT, wait=30)
        control = (  # the Control API's `flwr ls`, from a site, through the gateway
            "import ssl, urllib.request as u\n"
            "ctx = ssl.create_default_context(cafile='/certs/ca.crt')\n"
            f"r = u.Request('https://gateway:{GATEWAY_PORT}/v1/control/list-runs', data=b'', "
            "method='POST')\n"
            "try:\n    u.urlopen(r, context=ctx, timeout=10)\n"
            "except u.HTTPError as e:\n    print(e.code)\n"
        )
        assert compose.python("supernode-1", control).stdout.strip() == "403"
        for service in ("superlink", "serverapp", "gateway", "supernode-0", "clientapp-0"):
            assert compose("exec", "-T", service, "id", "-u").stdout.strip() == "49999", service
            held = compose("exec", "-T", service, "sh", "-c",
                           "ls /certs /run/secrets 2>/dev/null").stdout  # fmt: skip
            assert "ca.key" not in held, service
    finally:
        compose.down()
