"""Real deployment: SuperLink and SuperNodes as separate processes, as compose.yml runs them."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import DEPLOYED_IN_FLIGHT
from deployment import processes
from deployment.local_cluster import LocalCluster
from deployment.topology import (
    APP_IMAGE,
    COMPOSE_CREDENTIALS,
    GATEWAY_IMAGE,
    compose_nodes,
    compose_yaml,
    default_nodes,
    gateway_conf,
    site_address,
)
from server_app.outputs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PLUG_IN = ROOT / "examples" / "plug_in_model"
# the locked local cluster's gateway is an nginx (CI installs it)
needs_gateway = pytest.mark.skipif(
    shutil.which("nginx") is None,
    reason="the locked cluster's gateway needs nginx (apt-get install nginx-light)",
)


# ----------------------------------------------------------- compose.yml checks
def yaml_file(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "docker" / name).read_text())


def compose_services() -> dict[str, dict]:
    return yaml_file("compose.yml")["services"]


def test_compose_files_are_the_generated_topology():
    assert (ROOT / "docker" / "compose.yml").read_text() == compose_yaml(3), (
        "regenerate with: python -m deployment.topology --clients 3 > docker/compose.yml"
    )
    laptop = ROOT / "docker" / "compose.insecure-laptop.yml"
    assert laptop.read_text() == compose_yaml(3, insecure=True), (
        "regenerate with: python -m deployment.topology --clients 3 --insecure-laptop "
        "> docker/compose.insecure-laptop.yml"
    )
    assert (ROOT / "docker" / "gateway" / "nginx.conf").read_text() == gateway_conf(), (
        "regenerate with: python -m deployment.topology --gateway-config "
        "> docker/gateway/nginx.conf"
    )


def accepted_flags(program: str) -> set[str]:
    exe = Path(sys.executable).parent / program
    text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


@pytest.mark.parametrize("file", ["compose.yml", "compose.insecure-laptop.yml"])
def test_every_compose_command_uses_flags_the_installed_flower_accepts(file):
    help_cache: dict[str, set[str]] = {}
    for name, service in yaml_file(file)["services"].items():
        if "command" not in service or name == "gateway":
            continue  # flwr: its command comes at `docker-compose run`; gateway: nginx
        program = (
            service["entrypoint"][0]
            if "entrypoint" in service
            else {
                "flwr/superlink": "flower-superlink",
                "flwr/supernode": "flower-supernode",
            }[service["image"].split(":")[0]]
        )
        flags = help_cache.setdefault(program, accepted_flags(program))
        used = {a for a in service["command"] if a.startswith("--")}
        assert used <= flags, f"{name}: {sorted(used - flags)} not accepted by {program}"


def test_compose_networks_keep_each_site_to_itself():
    """Item 2 of the security review: one internal network per site (its SuperNode's
    Runtime API bound to that network's address, its ClientApp on nothing else); the
    SuperNodes reach the SuperLink side only through the gateway; nothing has a way out."""
    compose = yaml_file("compose.yml")
    svc = compose["services"]
    assert all(net.get("internal") for net in compose["networks"].values())
    assert not any("ports" in s for s in svc.values())

    def networks(name: str) -> set[str]:
        return set(svc[name]["networks"])

    assert networks("superlink") == networks("serverapp") == networks("flwr") == {"link"}
    assert networks("gateway") == {"link", "fleet"}
    for i in range(3):
        node, app = svc[f"supernode-{i}"], svc[f"clientapp-{i}"]
        assert networks(f"supernode-{i}") == {"fleet", f"site-{i}"}
        assert node["networks"][f"site-{i}"]["ipv4_address"] == site_address(i)
        cmd = node["command"]
        assert cmd[cmd.index("--host") + 1] == site_address(i)  # not 0.0.0.0: not on fleet
        assert cmd[cmd.index("--superlink") + 1] == "gateway:9443"
        assert networks(f"clientapp-{i}") == {f"site-{i}"}
        assert app["command"][app["command"].index("--runtime-api-address") + 1] == (
            f"{site_address(i)}:9094"
        )
        secret = COMPOSE_CREDENTIALS.site_secret(i)
        for command in (cmd, app["command"]):  # the site's own SuperExec secret, both ends
            assert command[command.index("--superexec-auth-secret-file") + 1] == secret
    flwr = svc["flwr"]
    assert flwr["image"] == APP_IMAGE and flwr["profiles"] == ["cli"]
    script = flwr["entrypoint"][2]
    assert 'address = "superlink:9091"' in script and script.endswith('exec flwr "$$@"')
    assert 'FLWR_SECURITY=root-certificates = "/certs/ca.crt"' in flwr["environment"]


def test_compose_is_locked_non_root_and_never_mounts_the_ca_key():
    """Items 1, 3 and 4: TLS, SuperNode authentication, SuperExec secrets; every service a
    non-root user without capabilities; the CA's key nowhere; each private file only where
    it is used."""
    compose = yaml_file("compose.yml")
    svc = compose["services"]
    link = svc["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--isolation") + 1] == "process"
    assert "--superexec-auth-secret-file" in link and "--ssl-keyfile" in link
    for name, service in svc.items():
        if name != "flwr":
            assert service["user"] == "49999:49999" and service["cap_drop"] == ["ALL"], name
            assert service["security_opt"] == ["no-new-privileges:true"], name
        assert "--insecure" not in service.get("command", []) or name.startswith("clientapp")
        mounts = " ".join(service.get("volumes", [])) + " ".join(service.get("secrets", []))
        assert "ca.key" not in mounts, name
    assert "ca.key" not in json.dumps(compose["secrets"])
    users = {}
    for name, service in svc.items():
        for secret in service.get("secrets", []):
            users.setdefault(secret, set()).add(name)
    assert users["superlink_key"] == {"superlink"} and users["gateway_key"] == {"gateway"}
    assert users["link_secret"] == {"superlink", "serverapp"}
    for i in range(3):
        assert users[f"site{i}_key"] == {f"supernode-{i}"}
        assert users[f"site{i}_secret"] == {f"supernode-{i}", f"clientapp-{i}"}
    gateway = svc["gateway"]
    assert gateway["image"] == GATEWAY_IMAGE and gateway["networks"] == ["link", "fleet"]
    conf = (ROOT / "docker" / "gateway" / "nginx.conf").read_text()
    assert "location /v1/fleet/ {" in conf and "location / { return 403; }" in conf
    assert "proxy_ssl_verify on;" in conf


def test_the_insecure_laptop_file_is_named_and_marked_so():
    text = (ROOT / "docker" / "compose.insecure-laptop.yml").read_text()
    assert "INSECURE LAPTOP MODE" in text.splitlines()[1]
    svc = yaml_file("compose.insecure-laptop.yml")["services"]
    assert svc["superlink"]["command"][0] == "--insecure"


def test_the_gateway_command_keeps_its_runtime_files_in_a_private_folder_of_its_own(
    tmp_path, monkeypatch, capsys
):
    """Not /tmp: two gateways on one host would share nginx's pid and temporary files."""
    from deployment import credentials, gateway

    credentials.main([str(tmp_path / "creds"), "--sites", "1", "--link-host", "127.0.0.1",
                      "--gateway-host", "127.0.0.1"])  # fmt: skip
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert gateway.main(["--credentials", "creds"]) == 0
    conf = capsys.readouterr().out
    runtime = tmp_path / "gateway-run"
    assert f"pid {runtime}/nginx.pid;" in conf and "/tmp/" not in conf.replace(str(tmp_path), "")
    assert runtime.is_dir() and runtime.stat().st_mode & 0o077 == 0
    runtime.chmod(0o755)  # an existing folder is made private too
    assert gateway.main(["--credentials", "creds"]) == 0
    assert runtime.stat().st_mode & 0o077 == 0


def test_compose_ports_and_node_configs_are_consistent():
    svc = compose_services()
    link = svc["superlink"]["command"]
    link_port = link[link.index("--port") + 1]
    server = svc["serverapp"]["command"]
    assert server[server.index("--runtime-api-address") + 1] == f"superlink:{link_port}"
    assert f"proxy_pass https://superlink:{link_port};" in gateway_conf()
    database = link[link.index("--database") + 1]
    assert svc["superlink"]["volumes"][0] == "superlink-state:/app" and database.startswith("/app/")
    keys, partitions = set(), set()
    nodes = sorted(n for n in svc if n.startswith("supernode-"))
    for name in nodes:
        cmd = svc[name]["command"]
        port = cmd[cmd.index("--port") + 1]
        index = name.split("-")[1]
        app = svc[f"clientapp-{index}"]["command"]
        assert app[app.index("--runtime-api-address") + 1] == f"{site_address(int(index))}:{port}"
        config = dict(
            pair.split("=", 1) for pair in shlex.split(cmd[cmd.index("--node-config") + 1])
        )
        assert config["partition-id"] == index and config["num-partitions"] == str(len(nodes))
        keys.add(config["client-key"])
        partitions.add(config["partition-id"])
    assert len(keys) == len(partitions) == len(nodes) == 3
    assert all(
        svc[n]["image"] == APP_IMAGE for n in svc if n.startswith(("clientapp", "serverapp"))
    )


def test_local_cluster_runs_the_same_commands_as_compose(tmp_path):
    nodes = compose_nodes(3)
    cluster = LocalCluster(nodes, tmp_path)
    assert cluster.locked  # by default, as compose.yml
    local = {s.name: s.argv for s in cluster.services()}
    compose = {
        name: [service.get("entrypoint", ["IMAGE"])[0], *service["command"]]
        for name, service in compose_services().items()
        if "command" in service
    }
    compose["gateway"] = compose["gateway"][1:]  # nginx images: the command is all of it
    local["superlink"][0] = local["supernode-0"][0] = local["supernode-1"][0] = "IMAGE"
    local["supernode-2"][0] = "IMAGE"
    assert local.keys() == compose.keys()

    def normalise(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            arg = re.sub(r"^(superlink|gateway|supernode-\d+|127\.0\.0\.1|172\.30\.\d+\.2):\d+$",
                         "HOST:PORT", arg)  # fmt: skip
            arg = re.sub(r"^(0\.0\.0\.0|127\.0\.0\.1|172\.30\.\d+\.2)$", "BIND", arg)
            arg = re.sub(r"^\d{4,5}$", "PORT", arg)
            arg = re.sub(r".*superlink\.db$", "DB", arg)
            arg = re.sub(r"^.*/(ca\.crt|nginx\.conf)$", r"\1", arg)
            arg = re.sub(r"^/run/secrets/|^/certs/|^.*/credentials/", "CRED/", arg)
            arg = arg.replace("_", ".").replace(".pem", "").replace("site.", "site-")
            out.append(re.sub(r"CRED/site(\d)\.", r"CRED/site-\1.", arg))
        return out

    for name in compose:
        assert normalise(local[name]) == normalise(compose[name]), name


def test_the_cluster_waits_for_all_its_sites_with_one_listing_per_poll(tmp_path, monkeypatch):
    """Starting (or restarting) sites polls one `flwr supernode list` for all of them, waits
    until every one is online, and names the sites that never came."""
    cluster = LocalCluster(compose_nodes(3), tmp_path)
    cluster.node_ids = {0: "10", 1: "11", 2: "12"}
    listings = iter([
        {"10": "registered", "11": "online", "12": "online"},
        {"10": "online", "11": "online", "12": "offline"},
        {"10": "online", "11": "online", "12": "online"},
    ])  # fmt: skip
    calls = []

    def flwr(*args):
        calls.append(args)
        nodes = [{"node-id": i, "status": s} for i, s in next(listings).items()]
        return subprocess.CompletedProcess(args, 0, json.dumps({"nodes": nodes}), "")

    monkeypatch.setattr(cluster, "_flwr", flwr)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    cluster._wait_nodes_status([0, 1, 2], wanted=True, timeout=60)
    assert len(calls) == 3 and all(c[:2] == ("supernode", "list") for c in calls)

    listings = iter([{"10": "online", "11": "online", "12": "offline"}] * 3)
    with pytest.raises(TimeoutError, match="site 2 offline"):
        cluster._wait_nodes_status([0, 1, 2], wanted=True, timeout=0)
    cluster.node_ids = {}  # unlocked: no ids known, nothing to wait for, no CLI call
    calls.clear()
    cluster._wait_nodes_status([0, 1, 2], wanted=True, timeout=0)
    assert calls == []


def test_sites_are_started_only_once_the_link_no_longer_counts_them_online(tmp_path, monkeypatch):
    """Restarting sites: wait until the SuperLink no longer has them online (it refuses a node
    whose old session still counts), launch each SuperNode and ClientApp, then wait until all
    are online; a site missing from the listing is not waited for."""
    cluster = LocalCluster(compose_nodes(3), tmp_path)
    cluster.node_ids = {0: "10", 2: "12"}  # site 1: no id known
    listings = iter([
        {"10": "online", "12": "offline"}, {"10": "offline", "12": "offline"},
        {"10": "online", "12": "offline"}, {"10": "online", "12": "online"},
    ])  # fmt: skip
    events = []

    def flwr(*args):
        events.append("list")
        nodes = [{"node-id": i, "status": s} for i, s in next(listings).items()]
        return subprocess.CompletedProcess(args, 0, json.dumps({"nodes": nodes}), "")

    monkeypatch.setattr(cluster, "_flwr", flwr)
    monkeypatch.setattr(cluster, "_launch", lambda service: events.append(service.name))
    monkeypatch.setattr(cluster, "_wait_listening", lambda name, port: None)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    cluster._launch_nodes([0, 1, 2])
    assert events == ["list", "list", "supernode-0", "clientapp-0", "supernode-1", "clientapp-1",
                      "supernode-2", "clientapp-2", "list", "list"]  # fmt: skip


@pytest.mark.parametrize(("module", "clients", "says"), [
    ("deployment.topology", "0", "at least one client site"),
    ("deployment.topology", "247", "room for 246 sites"),
    ("deployment.local_cluster", "0", "at least one client site"),
])  # fmt: skip
def test_a_site_count_out_of_range_is_refused_by_name(module, clients, says):
    """--clients 0 divided by zero; 247 compose sites made the address 172.30.256.2."""
    done = subprocess.run([sys.executable, "-m", module, "--clients", clients],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "--clients: " in done.stderr and says in done.stderr


def test_a_process_tree_follows_parents_and_exact_parent_pid_flags(monkeypatch):
    """A ClientApp names its SuperExec by `--parent-pid N`; pid 12's tree must not take a
    process of pid 123 (tearing one cluster down killed another's ClientApps)."""
    table = {
        12: (1, "flower-superexec"),
        13: (1, "flwr-clientapp --token t --parent-pid 123"),
        14: (12, "python child"),
        15: (1, "flwr-clientapp --parent-pid 12 --token t"),
        16: (15, "python grandchild"),
    }
    monkeypatch.setattr(processes, "_processes", lambda: table)
    assert processes.process_tree({12}) == {12, 14, 15, 16}
    assert processes.declared_parent("x --parent-pid 123") == 123
    assert processes.declared_parent("x --parent-pid") is None


# ------------------------------------------------------------ real processes
def mnist_run_config(mnist_npz: Path, out: Path, rounds: int, **extra: str) -> str:
    pairs = {
        "data.source": f'"npz:{mnist_npz}"',
        "data.fraction": "0.05",
        "data.cache_dir": f'"{out / "cache"}"',
        "client.epochs": "1",
        "rounds": str(rounds),
        "server.output_root": f'"{out}"',
        "server.run_name": '"deployed"',
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in pairs.items())


@pytest.mark.slow
@needs_gateway
def test_superlink_and_three_supernodes_with_a_plug_in_model(mnist_npz, tmp_path):
    nodes = default_nodes(3, ["lenet", "site_models:small_cnn", "mlp"])
    cluster = LocalCluster(nodes, tmp_path, client_env={"PYTHONPATH": str(PLUG_IN)})
    with cluster:
        done = cluster.flwr_run(mnist_run_config(mnist_npz, tmp_path / "out", rounds=2))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    rows = read_metrics(tmp_path / "out" / "deployed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2], log[-3000:]
    last = rows[-1]
    assert last["clients_trained"] == 3 and last["clients_evaluated"] == 3 and not last["rejected"]
    assert set(last["client_accuracy"]) == {"site-0", "site-1", "site-2"}
    assert last["accuracy"] > rows[0]["accuracy"]
    assert last["clients_in_flight"] == DEPLOYED_IN_FLIGHT  # deployed, `in_flight: auto`
    assert not any(p.poll() is None for p in cluster.processes.values())


@pytest.mark.slow
@needs_gateway
def test_a_deployed_round_keeps_every_site_training(mnist_npz, tmp_path):
    """one_by_one with 3 clients in flight on 3 SuperNodes: the server keeps the 3 train
    messages outstanding at once, so every site trains the vector of the round's start (the
    one it evaluated at the end of the round before), not one holding another site's step."""
    nodes = default_nodes(3, ["lenet", "mlp", "lenet"])
    logs = {n.index: tmp_path / f"received-{n.index}.jsonl" for n in nodes}
    extra = {i: f'message-log="{path}"' for i, path in logs.items()}
    flight = {"hypernetwork.in_flight": "3", "server.timeout_s": "120"}
    with LocalCluster(nodes, tmp_path, extra_node_config=extra) as cluster:
        done = cluster.flwr_run(mnist_run_config(mnist_npz, tmp_path / "out", 2, **flight))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = read_metrics(tmp_path / "out" / "deployed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients_in_flight"] for r in rows[1:]] == [3, 3]
    assert all(r["clients_trained"] == 3 and not r["rejected"] for r in rows[1:])
    for path in logs.values():
        received = {(e["round"], e["type"]): e["sha256"] for e in read_log(path)}
        for server_round in (1, 2):
            assert received[server_round, "train"] == received[server_round - 1, "evaluate"]


def claim_task(address: str, task_type: str, ca: str | None = None) -> str:
    """What a process without the SuperExec secret gets when it asks a Runtime API for a
    task (Flower's own client, as a rogue site would use it): 'token', 'none' or the error."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=ca is None, root_certificates=ca,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )  # fmt: skip
    try:
        reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
    except Exception as err:  # noqa: BLE001 - the refusal is what this returns
        return f"{type(err).__name__}: {err}"
    return "token" if reply.token else "none"


def flwr_through(cluster: LocalCluster, address: str, home: Path, *args: str):
    """`flwr ARGS site` from a site's point of view: only the CA certificate, and the
    address it knows (the gateway)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "site"\n[superlink.site]\n'
        f'address = "{address}"\nroot-certificates = "{cluster.credentials.ca}"\n'
    )
    env = {**cluster.env, "FLWR_HOME": str(home)}
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "site"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.slow
@needs_gateway
def test_the_locked_cluster_refuses_what_a_site_could_try(mnist_npz, tmp_path):
    """Locked by default: through the gateway (all a site reaches) no Control API (no
    `flwr ls`, no key registration); a SuperNode whose key the operator did not register
    stays out (no Sybils); a process without a site's SuperExec secret cannot claim that
    site's ClientApp tasks, nor the ServerApp's on the SuperLink; the honest sites train."""
    from deployment.credentials import node_key_pair

    nodes = default_nodes(2, ["lenet", "mlp"])
    with LocalCluster(nodes, tmp_path) as cluster:
        assert cluster.locked
        gateway = f"{cluster.host}:{cluster.gateway_port}"
        listed = flwr_through(cluster, gateway, tmp_path / "site-home", "ls")
        assert listed.returncode != 0 and "403" in listed.stdout + listed.stderr, listed
        node_key_pair(tmp_path / "rogue.key")
        register = flwr_through(cluster, gateway, tmp_path / "site-home", "supernode",
                                "register", str(tmp_path / "rogue.key.pub"))  # fmt: skip
        assert "registered successfully" not in register.stdout + register.stderr, register
        with (tmp_path / "logs" / "sybil.log").open("wb") as log:
            sybil = subprocess.Popen(
                ["flower-supernode", "--root-certificates", cluster.credentials.ca,
                 "--superlink", gateway, "--auth-supernode-private-key",
                 str(tmp_path / "rogue.key"), "--isolation", "process", "--host", "127.0.0.1",
                 "--port", str(cluster.node_ports[0] + 1), "--max-retries", "2",
                 "--node-config", 'client-key="sybil" model="lenet" partition-id=0 '
                 "num-partitions=2"],
                env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        assert sybil.wait(timeout=120) != 0  # refused: its key is not registered
        site = f"{cluster.host}:{cluster.node_ports[0]}"
        assert "401" in claim_task(site, "flwr-clientapp")
        link = f"{cluster.host}:{cluster.superlink_port}"
        assert "401" in claim_task(link, "flwr-serverapp", cluster.credentials.ca)
        done = cluster.flwr_run(mnist_run_config(mnist_npz, tmp_path / "out", rounds=1))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = read_metrics(tmp_path / "out" / "deployed" / "metrics.jsonl")
    assert rows[-1]["clients_trained"] == 2 and not rows[-1]["rejected"]
    assert set(rows[-1]["client_accuracy"]) == {"site-0", "site-1"}


@pytest.mark.slow
def test_the_insecure_laptop_mode_is_what_the_locked_one_refuses(tmp_path):
    """The same probes against `insecure=True` get in: why it is named so (and what main
    before the locked deployment gave every peer)."""
    nodes = default_nodes(1, ["lenet"])
    with LocalCluster(nodes, tmp_path, insecure=True) as cluster:
        assert not cluster.locked
        home = tmp_path / "peer-home"
        home.mkdir()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "peer"\n[superlink.peer]\n'
            f'address = "{cluster.host}:{cluster.superlink_port}"\ninsecure = true\n'
        )
        listed = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "peer"],
                                env={**cluster.env, "FLWR_HOME": str(home)},
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert listed.returncode == 0, listed
        assert claim_task(f"{cluster.host}:{cluster.node_ports[0]}", "flwr-clientapp") == "none"


def read_log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@needs_gateway
def test_a_killed_supernode_comes_back_with_its_own_embeddings(mnist_npz, tmp_path):
    """Kill site-2 while round 2 runs: the round and the run finish with the others. The site
    restarts (same key and secret; locked, the same node id, once the SuperLink has let its
    killed session go) and a resumed run sends it the vector it had before (a parallel round:
    round 3's train vector is round 2's evaluation vector; under one_by_one it would also hold
    the steps of the clients before it in round 3's order)."""
    nodes = default_nodes(3, ["lenet", "mlp", "lenet"])
    message_logs = {n.index: tmp_path / f"received-{n.index}.jsonl" for n in nodes}
    extra = {i: f'message-log="{path}"' for i, path in message_logs.items()}
    out = tmp_path / "out"
    parallel = {"server.timeout_s": "45", "hypernetwork.schedule": '"parallel_sequential"'}
    config = mnist_run_config(mnist_npz, out, rounds=2, **parallel)
    with LocalCluster(nodes, tmp_path, extra_node_config=extra) as cluster:
        run = cluster.flwr_run(config, wait=False)
        deadline = time.monotonic() + 600
        while not any(
            e["round"] == 2 and e["type"] == "evaluate" for e in read_log(message_logs[2])
        ):
            assert time.monotonic() < deadline and run.poll() is None, "round 2 never reached"
            time.sleep(0.05)  # the SuperNode pushes the reply within ~0.5 s: kill before that
        cluster.stop_node(2)
        assert run.wait(timeout=600) == 0, (tmp_path / "logs" / "flwr-run.log").read_text()[-3000:]
        rows = read_metrics(out / "deployed" / "metrics.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert rows[-1]["clients_evaluated"] == 2
        assert [r["client"] for r in rows[-1]["rejected"]] == ["site-2"]
        before = read_log(message_logs[2])[-1]

        cluster.start_node(2)
        resume = {**parallel, "server.resume": f'"{out / "deployed"}"'}
        done = cluster.flwr_run(mnist_run_config(mnist_npz, out, rounds=3, **resume))
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    after = next(e for e in read_log(message_logs[2]) if e["round"] == 3)
    assert after["type"] == "train" and after["sha256"] == before["sha256"]
    rows = read_metrics(out / "deployed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["clients_trained"] == 3


# ------------------------------------------------------------------ the traps
def test_relative_data_paths_are_made_absolute_from_where_the_command_runs(tmp_path):
    from deployment.local_cluster import absolute_data_path, absolute_data_paths

    config = 'data.source="npz:../data/m.npz" rounds=2 data.root="data" client.lr=0.01'
    got = absolute_data_paths(config, tmp_path / "here")
    assert f'data.source="npz:{tmp_path}/data/m.npz"' in got
    assert f'data.root="{tmp_path}/here/data"' in got and "rounds=2" in got
    assert absolute_data_path("mnist", tmp_path) == "mnist"  # a torchvision name
    assert absolute_data_path("npz:/abs/m.npz", tmp_path) == "npz:/abs/m.npz"


def test_a_relative_path_that_is_not_there_says_from_where_it_was_looked_up(tmp_path):
    from common.datasets import DatasetUnavailableError, load_dataset

    with pytest.raises(DatasetUnavailableError, match="relative and does not exist .*absolute"):
        load_dataset("npz:no/such/mnist.npz")


@pytest.mark.slow
@needs_gateway
def test_a_deployment_where_no_client_can_load_its_data_fails_loudly(tmp_path):
    """Every SuperNode refuses (its data path does not exist): the run stops with each
    node's reason and flwr run exits non-zero, instead of running rounds with no client."""
    nodes = default_nodes(2, ["lenet"], "npz:/nonexistent/mnist.npz")
    with LocalCluster(nodes, tmp_path) as cluster:
        done = cluster.flwr_run("rounds=2 server.wait_for_nodes_s=60", timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "finished:failed" in done.stderr, log[-3000:]
    assert "0 client(s) admitted" in log and log.count("not available") >= 2, log[-3000:]


def test_a_terminated_command_still_stops_what_its_with_block_started(tmp_path):
    """`timeout` or a closed terminal sends SIGTERM/SIGHUP: the local cluster's `with` block
    must still run its cleanup (it left its SuperLink and SuperNodes running; found by a user)."""
    marker = tmp_path / "cleaned"
    script = f"""
import contextlib, pathlib, sys, time
from deployment.processes import exit_on_termination

@contextlib.contextmanager
def started():
    try:
        yield
    finally:
        pathlib.Path({str(marker)!r}).write_text("stopped")

with exit_on_termination(), started():
    print("up", flush=True)
    time.sleep(60)
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert child.stdout.readline().strip() == "up"
    child.terminate()
    assert child.wait(timeout=30) == 128 + 15
    assert marker.read_text() == "stopped"
