"""The locked deployment between real separate hosts: the SuperLink's host, two client sites,
a rogue and a workstation each in their own Linux network namespace, wired through a bridge,
as on a LAN (needs root, `ip` and nginx).

    switch namespace:  bridge br0 ── veth ──┬─ link    10.231.0.1   SuperLink (on its loopback),
                                            │                       ServerApp SuperExec, gateway,
                                            │                       the operator's `flwr`
                                            ├─ site0   10.231.0.10  SuperNode + ClientApp SuperExec
                                            ├─ site1   10.231.0.11  SuperNode + ClientApp SuperExec
                                            ├─ rogue   10.231.0.66  what a stranger on the LAN tries
                                            └─ ws      10.231.0.100 a workstation on the LAN
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

from deployment.credentials import node_key_pair
from deployment.local_cluster import LocalCluster
from deployment.processes import kill_tree, listening_ports, process_tree
from deployment.topology import Node, default_nodes
from server_app.outputs import read_metrics
from tests.test_deployment import mnist_run_config

SUBNET = "10.231.0"
ADDRESSES = {"link": 1, "site0": 10, "site1": 11, "rogue": 66, "ws": 100}


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


def cluster_on(hosts: Hosts, nodes: list[Node], workdir: Path, **kwargs) -> LocalCluster:
    """Locked: the SuperLink on the `link` host's loopback (the ServerApp's SuperExec and the
    operator's `flwr` run there too), the gateway on its LAN address; site i's two processes
    on `site<i>`, its SuperNode's Runtime API on that host's loopback. The services' own
    commands, behind `ip netns exec <host>`."""
    link = hosts.address("link")
    prefix = {"superlink": hosts.exec("link"), "serverapp": hosts.exec("link"),
              "gateway": hosts.exec("link"), "flwr": hosts.exec("link")}  # fmt: skip
    for node in nodes:
        prefix[f"supernode-{node.index}"] = hosts.exec(f"site{node.index}")
        prefix[f"clientapp-{node.index}"] = hosts.exec(f"site{node.index}")
    local = {f"supernode-{n.index}": "127.0.0.1" for n in nodes}
    return LocalCluster(
        nodes,
        workdir,
        prefix=prefix,
        hosts={"superlink": "127.0.0.1", "gateway": link, **local},
        binds={"superlink": "127.0.0.1", "gateway": link, **local},
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
def test_the_locked_deployment_across_network_namespaces(hosts, mnist_npz, tmp_path):
    if shutil.which("nginx") is None:
        pytest.skip("the gateway needs nginx (apt-get install nginx-light)")
    nodes = default_nodes(2, ["lenet", "mlp"])
    link = hosts.address("link")
    cluster = cluster_on(hosts, nodes, tmp_path)
    rogue = None
    started = time.monotonic()
    try:
        cluster.start()
        pids = {name: p.pid for name, p in cluster.processes.items()}
        # separate hosts: the SuperLink listens on its own host's loopback only; the sites
        # reach the gateway on the LAN
        assert cluster.superlink_port in listening_ports(pids["superlink"])
        assert cluster.superlink_port not in listening_ports(pids["supernode-0"])
        assert cluster.gateway_port in listening_ports(pids["gateway"])
        assert cluster.node_ports[0] not in listening_ports(pids["superlink"])
        probe = [*hosts.exec("rogue"), sys.executable, "-c"]

        def from_rogue(code: str) -> subprocess.CompletedProcess:
            return subprocess.run([*probe, code], capture_output=True, text=True, timeout=60)

        # from the LAN: the SuperLink's port is not there at all
        connect = f"import socket; socket.create_connection(({link!r}, %d), 5)"
        assert from_rogue(connect % cluster.superlink_port).returncode != 0
        assert from_rogue(connect % cluster.gateway_port).returncode == 0
        # through the gateway: the Control API answers 403 (no `flwr ls`, no registering)
        control = (
            "import ssl, urllib.request as u\n"
            f"ctx = ssl.create_default_context(cafile={cluster.credentials.ca!r})\n"
            f"r = u.Request('https://{link}:{cluster.gateway_port}/v1/control/list-runs', "
            "data=b'', method='POST')\n"
            "try:\n    u.urlopen(r, context=ctx, timeout=10)\n"
            "except u.HTTPError as e:\n    print(e.code)\n"
        )
        assert from_rogue(control).stdout.strip() == "403"

        # a SuperNode on the rogue host with a key of its own: refused (not registered)
        node_key_pair(tmp_path / "rogue.key")
        with (tmp_path / "logs" / "rogue.log").open("wb") as rogue_log:
            rogue = subprocess.Popen(
                [*hosts.exec("rogue"), "flower-supernode", "--root-certificates",
                 cluster.credentials.ca, "--superlink", f"{link}:{cluster.gateway_port}",
                 "--auth-supernode-private-key", str(tmp_path / "rogue.key"),
                 "--max-retries", "3", "--max-wait-time", "30", "--isolation", "process",
                 "--host", "127.0.0.1", "--port", "9094", "--node-config",
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
        for host in ("link", "site0", "site1"):
            assert hosts.bytes_through_switch(host) > 10_000, host
        rogue_rc = rogue.wait(timeout=120)
        rogue_text = (tmp_path / "logs" / "rogue.log").read_text()
        assert rogue_rc != 0 and "Failed to activate SuperNode" in rogue_text, rogue_text[-2000:]
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
    markers = (f"{link}:{cluster.gateway_port}", str(tmp_path))
    alive = [
        line
        for line in ps.splitlines()
        if (int(line.split()[0]) in tree or any(m in line for m in markers))
        and not line.split()[1].startswith("Z")
    ]
    assert not alive, "\n".join(alive)
    print(f"2 rounds, locked, across namespaces: {run_s:.0f} s")
