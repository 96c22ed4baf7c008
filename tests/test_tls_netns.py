"""TLS between real separate hosts: the SuperLink, two client sites and a workstation each in
their own Linux network namespace, wired through a bridge, as on a LAN (needs root and `ip`).

    switch namespace:  bridge br0 ── veth ──┬─ link    10.231.0.1   SuperLink + ServerApp SuperExec
                                            ├─ site0   10.231.0.10  SuperNode + ClientApp SuperExec
                                            ├─ site1   10.231.0.11  SuperNode + ClientApp SuperExec
                                            ├─ rogue   10.231.0.66  a SuperNode without TLS
                                            └─ ws      10.231.0.100 `flwr run`
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from deployment.local_cluster import LocalCluster
from deployment.processes import kill_tree, listening_ports, process_tree
from deployment.topology import TLS, Node, default_nodes
from server_app.outputs import read_metrics
from tests.test_deployment import mnist_run_config

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.231.0"
ADDRESSES = {"link": 1, "site0": 10, "site1": 11, "rogue": 66, "ws": 100}
# what a plain-HTTP SuperNode reports when it reaches the SuperLink's TLS port
NO_REPLY_REASONS = ("Server disconnected without sending a response", "Connection reset by peer")


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


class Hosts:
    """Network namespaces as hosts on one LAN; removed (and emptied) on close."""

    def __init__(self) -> None:
        self.tag = tag = f"mhp{os.getpid()}"
        self.switch = f"{tag}-sw"
        self.ns = {host: f"{tag}-{host}" for host in ADDRESSES}
        self.created: list[str] = []

    def address(self, host: str) -> str:
        return f"{SUBNET}.{ADDRESSES[host]}"

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def create(self) -> Hosts:
        self._add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host, ns in self.ns.items():
            self._add_namespace(ns)
            port = f"to-{host}"  # the switch's end of this host's cable
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
               "netns", self.switch)  # fmt: skip
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def bytes_through_switch(self, host: str) -> int:
        """Bytes the switch received from and sent to `host` over its veth."""
        (link,) = json.loads(ip("-n", self.switch, "-j", "-s", "link", "show", f"to-{host}"))
        stats = link["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def pids(self) -> set[int]:
        out = set()
        for name in self.created:
            with suppress(RuntimeError):
                out |= {int(p) for p in ip("netns", "pids", name).split()}
        return out

    def close(self) -> None:
        """Kill what still runs in our namespaces (only ours), then delete them."""
        kill_tree(self.pids(), grace=2.0)
        for name in reversed(self.created):
            with suppress(RuntimeError):
                ip("netns", "delete", name)
        self.created.clear()


@pytest.fixture
def hosts():
    if shutil.which("ip") is None:
        pytest.skip("network namespaces: the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces: creating them needs root")
    net = Hosts()
    try:
        try:
            net.create()
        except RuntimeError as err:
            pytest.skip(f"cannot build the namespace network: {err}")
        yield net
    finally:
        net.close()
        left = {n for n in ip("netns", "list").split() if n.startswith(net.tag + "-")}
        assert not left, f"namespaces left behind: {left}"


def make_certs(hosts: Hosts, folder: Path) -> TLS:
    """make_certs.sh for the SuperLink's address on the LAN."""
    made = subprocess.run(
        [str(ROOT / "deployment" / "make_certs.sh"), str(folder), hosts.address("link")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "server.pem" in made.stdout
    assert (folder / "server.key").stat().st_mode & 0o777 == 0o600
    assert (folder / "ca.key").stat().st_mode & 0o777 == 0o600
    return TLS(str(folder / "ca.crt"), str(folder / "server.pem"), str(folder / "server.key"))


def cluster_on(hosts: Hosts, nodes: list[Node], workdir: Path, tls: TLS, **kwargs) -> LocalCluster:
    """SuperLink and ServerApp SuperExec on `link`, site i's two processes on `site<i>`,
    `flwr run` on `ws`: the services' own commands, behind `ip netns exec <host>`."""
    link = hosts.address("link")
    prefix = {"superlink": hosts.exec("link"), "serverapp": hosts.exec("link"),
              "flwr": hosts.exec("ws")}  # fmt: skip
    for node in nodes:
        prefix[f"supernode-{node.index}"] = hosts.exec(f"site{node.index}")
        prefix[f"clientapp-{node.index}"] = hosts.exec(f"site{node.index}")
    local = {f"supernode-{n.index}": "127.0.0.1" for n in nodes}
    return LocalCluster(
        nodes,
        workdir,
        tls=tls,
        prefix=prefix,
        # the SuperLink is reached over the LAN; each SuperNode only by its own ClientApps
        hosts={"superlink": link, **local},
        binds={"superlink": link, **local},
        **kwargs,
    )


def flwr_run(cluster: LocalCluster, config: str):
    try:
        done = cluster.flwr_run(config, timeout=600)
    except subprocess.TimeoutExpired as err:
        logs = "".join(
            f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(cluster.logs.glob("*.log"))
        )
        pytest.fail(f"`flwr run` timed out after {err.timeout} s; logs:\n{logs}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.mark.slow
def test_tls_across_network_namespaces(hosts, mnist_npz, tmp_path):
    tls = make_certs(hosts, tmp_path / "certs")
    nodes = default_nodes(2, ["lenet", "mlp"])
    link = hosts.address("link")
    cluster = cluster_on(hosts, nodes, tmp_path, tls)
    rogue = None
    started = time.monotonic()
    try:
        cluster.start()
        pids = {name: p.pid for name, p in cluster.processes.items()}
        # separate hosts: the SuperLink's port is open on `link` only, not on a site's loopback
        assert cluster.superlink_port in listening_ports(pids["superlink"])
        assert cluster.superlink_port not in listening_ports(pids["supernode-0"])
        assert cluster.node_ports[0] not in listening_ports(pids["superlink"])

        # a SuperNode without TLS (and no CA) on another host: it must not get in
        with (tmp_path / "logs" / "rogue.log").open("wb") as rogue_log:
            rogue = subprocess.Popen(
                [*hosts.exec("rogue"), "flower-supernode", "--insecure", "--superlink",
                 f"{link}:{cluster.superlink_port}", "--max-retries", "3",
                 "--max-wait-time", "30", "--isolation", "process", "--host", "127.0.0.1",
                 "--port", "9094", "--node-config",
                 'client-key="rogue" model="lenet" partition-id=0 num-partitions=2'],
                env=cluster.env, cwd=tmp_path, stdout=rogue_log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

        out = tmp_path / "out"
        config = mnist_run_config(mnist_npz, out, rounds=2, **{"server.timeout_s": "60"})
        done = flwr_run(cluster, config)
        log = done.stdout + done.stderr
        run_s = time.monotonic() - started

        rows = read_metrics(out / "deployed" / "metrics.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2], log[-3000:]
        last = rows[-1]
        assert last["clients_trained"] == 2 and last["clients_evaluated"] == 2, last
        assert not last["rejected"], last["rejected"]
        assert set(last["client_accuracy"]) == {"site-0", "site-1"}

        # the model vectors really went through the switch, between the hosts
        for host in ("link", "site0", "site1", "ws"):
            assert hosts.bytes_through_switch(host) > 10_000, host
        # the plain-HTTP node reached the SuperLink's port but got no reply (TLS there), gave
        # up with an error and never took part
        rogue_rc = rogue.wait(timeout=120)
        rogue_text = (tmp_path / "logs" / "rogue.log").read_text()
        assert rogue_rc != 0, rogue_text[-2000:]
        # the TLS side answers the plain-HTTP hello by closing or by resetting the connection
        # (which one depends on timing); either way the node exits with Flower's code 305
        assert "Exit Code: 305" in rogue_text, rogue_text[-2000:]
        assert any(reason in rogue_text for reason in NO_REPLY_REASONS), rogue_text[-2000:]
        tree = process_tree(set(pids.values()))
    finally:
        cluster.stop()
        if rogue is not None:
            kill_tree({rogue.pid}, grace=1.0)
            rogue.wait(timeout=10)
        print(f"cluster up to run end: {time.monotonic() - started:.0f} s")

    # nothing left: not our processes (by pid), nothing in the namespaces, nothing in `ps`
    assert not hosts.pids()
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    markers = (f"{link}:{cluster.superlink_port}", str(tmp_path))
    alive = [
        line
        for line in ps.splitlines()
        if (int(line.split()[0]) in tree or any(m in line for m in markers))
        and not line.split()[1].startswith("Z")
    ]
    assert not alive, "\n".join(alive)
    print(f"2 rounds over TLS across namespaces: {run_s:.0f} s")


@pytest.mark.slow
def test_supernode_authentication_across_network_namespaces(hosts, mnist_npz, tmp_path):
    """--enable-supernode-auth: site-0's key is registered from the workstation and it trains;
    site-1's key is not, and the SuperLink refuses it."""
    tls = make_certs(hosts, tmp_path / "certs")
    keys = tmp_path / "keys"
    keys.mkdir()
    for site in ("site0", "site1"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(keys / site)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    node0, node1 = default_nodes(2, ["lenet", "mlp"])
    cluster = cluster_on(
        hosts, [node0], tmp_path, tls,
        extra_args={"superlink": ["--enable-supernode-auth"],
                    "supernode-0": ["--auth-supernode-private-key", str(keys / "site0")]},
    )  # fmt: skip
    link = f"{hosts.address('link')}:{cluster.superlink_port}"
    stranger = None
    try:
        cluster.start_link()
        flwr = [*hosts.exec("ws"), str(Path(sys.executable).parent / "flwr")]
        done = subprocess.run(
            [*flwr, "supernode", "register", str(keys / "site0.pub"), "cluster"],
            env=cluster.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr
        cluster.start_node(0)

        # site-1: TLS and a key, but one the SuperLink does not know
        stranger_log = tmp_path / "logs" / "unregistered.log"
        with stranger_log.open("wb") as log:
            stranger = subprocess.Popen(
                [*hosts.exec("site1"), "flower-supernode", "--root-certificates", tls.ca,
                 "--superlink", link, "--auth-supernode-private-key", str(keys / "site1"),
                 "--max-retries", "3", "--max-wait-time", "30", "--isolation", "process",
                 "--host", "127.0.0.1", "--port", "9094", "--node-config", node1.node_config()],
                env=cluster.env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        stranger_rc = stranger.wait(timeout=120)
        text = stranger_log.read_text()
        assert stranger_rc != 0 and "Failed to activate SuperNode" in text, text[-2000:]

        out = tmp_path / "out"
        config = mnist_run_config(mnist_npz, out, rounds=1, **{"server.timeout_s": "60"})
        flwr_run(cluster, config)
        rows = read_metrics(out / "deployed" / "metrics.jsonl")
        assert [r["round"] for r in rows] == [0, 1]
        assert rows[-1]["clients_trained"] == 1 and not rows[-1]["rejected"]
        assert set(rows[-1]["client_accuracy"]) == {"site-0"}
    finally:
        cluster.stop()
        if stranger is not None:
            kill_tree({stranger.pid}, grace=1.0)
            stranger.wait(timeout=10)
    assert not hosts.pids()
