"""Run the docker/compose.yml topology as local processes, `flwr run` against it, stop it all.

    python -m deployment.local_cluster --clients 3 --models lenet,mlp \\
        --run-config 'data.source="npz:../shared/data/mnist.npz" rounds=2'

Starts a SuperLink, the ServerApp's SuperExec, and per client a SuperNode and its ClientApp
SuperExec (process isolation, as in compose.yml, same commands), runs the app with `flwr run`,
then stops every process it started, their children included. Logs go to <workdir>/logs/.

Locked by default, as compose.yml: credentials made in <workdir>/credentials (TLS, SuperExec
secrets, the sites' keys, registered with `flwr supernode register` before the sites start),
the sites connect through the gateway (nginx, passing the Fleet API alone). `--insecure` runs
the laptop mode: no TLS, no authentication, anyone who reaches a port controls everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.common.config import parse_config_args

from common.config import run_config_string
from deployment.credentials import Credentials, make_credentials
from deployment.gateway import nginx_config
from deployment.processes import (
    exit_on_termination,
    free_port,
    kill_tree,
    wait_for_listen,
    wait_for_port,
)
from deployment.topology import TLS, Node, Service, default_nodes, services

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CONNECTION = "cluster"


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's commands: private home, no runtime installs, no telemetry."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        # Flower starts its helpers by name: use this interpreter's scripts
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


class LocalCluster:
    """The topology on one machine; nodes can be stopped and restarted (same key).

    By default every process runs here and listens on `host`. To put services on other
    (e.g. network-namespace) hosts: `prefix[name]` goes before service `name`'s command (and
    `prefix["flwr"]` before `flwr run` and `flwr ls`), e.g. ["ip", "netns", "exec", "ns0"];
    `hosts[name]` is the address the others reach it at and `binds[name]` the address it listens on.
    `service_env` is set for every service (over its own environment).
    """

    def __init__(
        self,
        nodes: list[Node],
        workdir: Path,
        *,
        insecure: bool = False,
        tls: TLS | None = None,
        host: str = HOST,
        extra_node_config: dict[int, str] | None = None,
        client_env: dict[str, str] | None = None,
        prefix: dict[str, list[str]] | None = None,
        hosts: dict[str, str] | None = None,
        binds: dict[str, str] | None = None,
        service_env: dict[str, str] | None = None,
    ) -> None:
        # every site keeps its state (its client secret included) across restarts
        self.nodes = [
            n if n.state_dir else dataclasses.replace(n, state_dir=str(workdir / "state"))
            for n in nodes
        ]
        self.workdir = workdir
        self.tls = tls  # TLS alone (no authentication): kept for comparisons
        # locked unless told otherwise (or given TLS alone); made when the cluster starts
        self.locked = not insecure and tls is None
        self.credentials = Credentials.in_folder(workdir / "credentials") if self.locked else None
        self.host = host
        self.extra_node_config = extra_node_config or {}
        # the sites share this machine: their training threads split its cores (unless
        # OMP_NUM_THREADS is set), rather than each site oversubscribing all of them
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(nodes)))}
        self.client_env = {**({} if "OMP_NUM_THREADS" in os.environ else threads),
                           **(client_env or {})}  # fmt: skip
        self.prefix = prefix or {}
        self.hosts = hosts or {}
        self.binds = binds or {}
        self.service_env = service_env or {}  # over every service's own (e.g. poll intervals)
        self.superlink_port = free_port()
        self.gateway_port = free_port()
        self.node_ports = {n.index: free_port() for n in nodes}
        self.env = flower_environment(workdir / "flwr-home")
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[int, str] = {}  # site index -> node id (locked: fixed by its key)

    # --------------------------------------------------------------- services
    def services(self) -> list[Service]:
        """Exactly compose.yml's services, with local hosts and ports."""
        out = services(
            self.nodes,
            host_of=self.host_of,
            superlink_port=self.superlink_port,
            supernode_port=lambda node: self.node_ports[node.index],
            bind_host=lambda name: self.binds.get(name, self.host),
            database=str(self.workdir / "superlink.db"),
            tls=self.tls,
            credentials=self.credentials,
            gateway_port=self.gateway_port,
            gateway_config=str(self.workdir / "gateway" / "nginx.conf"),
        )
        for service in out:
            index = _node_index(service.name, "supernode-")
            if index is not None and index in self.extra_node_config:
                service.argv[-1] += " " + self.extra_node_config[index]
        return out

    def host_of(self, name: str) -> str:
        """The address service `name` is reached at."""
        return self.hosts.get(name, self.host)

    def _service(self, name: str) -> Service:
        return next(s for s in self.services() if s.name == name)

    def _launch(self, service: Service) -> None:
        log = (self.logs / f"{service.name}.log").open("ab")
        env = {**self.env, **service.env, **self.service_env}
        if service.name.startswith("clientapp-"):
            env.update(self.client_env)
        self.processes[service.name] = subprocess.Popen(
            [*self.prefix.get(service.name, []), *service.argv],
            env=env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> LocalCluster:
        try:
            self.start_link()
            self._launch_nodes([node.index for node in self.nodes])
        except BaseException:
            self.stop()  # what did start: `with` does not stop a cluster that failed to start
            raise
        return self

    def start_link(self) -> None:
        """The SuperLink and the ServerApp's SuperExec, and when locked the gateway and the
        sites' registration (start() = this + every node)."""
        if self.locked:
            self._make_credentials()
        self._write_connection()
        self._launch(self._service("superlink"))
        self._wait_listening("superlink", self.superlink_port)
        self._launch(self._service("serverapp"))
        if self.locked:
            self._launch(self._service("gateway"))
            self._wait_listening("gateway", self.gateway_port)
            for node in self.nodes:
                self.register_node(node.index)

    def _make_credentials(self) -> None:
        if shutil.which("nginx") is None:
            raise RuntimeError(
                "the locked deployment's gateway needs nginx (apt-get install nginx-light); "
                "LocalCluster(insecure=True) / --insecure runs the unlocked laptop mode"
            )
        self.credentials = make_credentials(
            Path(self.credentials.ca).parent,
            len(self.nodes),
            # nginx checks the SuperLink's certificate by a DNS name, as compose names it
            link_hosts=[self.host_of("superlink"), "superlink"],
            gateway_hosts=[self.host_of("gateway")],
        )
        runtime = self.workdir / "gateway"
        runtime.mkdir(parents=True, exist_ok=True)
        (runtime / "nginx.conf").write_text(nginx_config(
            listen=f"{self.binds.get('gateway', self.host)}:{self.gateway_port}",
            upstream=f"{self.host_of('superlink')}:{self.superlink_port}",
            upstream_name="superlink",
            cert=self.credentials.gateway_cert,
            key=self.credentials.gateway_key,
            ca=self.credentials.ca,
            runtime_dir=str(runtime),
            user="root" if os.geteuid() == 0 else None,
        ))  # fmt: skip

    def register_node(self, index: int) -> None:
        """The operator registers site `index`'s public key (Control API, direct to the
        SuperLink), so that its SuperNode may connect."""
        assert self.credentials is not None
        done = self._flwr("supernode", "register", self.credentials.node_public_key(index),
                          CONNECTION)  # fmt: skip
        if done.returncode != 0 or "registered" not in done.stdout + done.stderr:
            raise RuntimeError(f"registering site {index}'s key failed:\n"
                               f"{(done.stdout + done.stderr)[-2000:]}")  # fmt: skip
        found = re.search(r"SuperNode (\d+) registered", done.stdout + done.stderr)
        if found:
            self.node_ids[index] = found.group(1)

    def _flwr(self, *args: str) -> subprocess.CompletedProcess:
        """One `flwr` CLI command against the cluster (Control API), its output captured."""
        command = [*self.prefix.get("flwr", []), str(Path(sys.executable).parent / "flwr"), *args]
        return subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    def node_statuses(self) -> dict[int, str]:
        """The SuperLink's status of each site's node ("online", "offline", ...) by site index,
        from one listing; sites whose node id is unknown (unlocked: ids are not fixed in
        advance) are absent."""
        if not self.node_ids:
            return {}
        done = self._flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            by_id = {n["node-id"]: n["status"] for n in json.loads(done.stdout)["nodes"]}
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(f"flwr supernode list failed:\n{(done.stdout + done.stderr)[-2000:]}"
                               ) from err  # fmt: skip
        return {i: by_id[node] for i, node in self.node_ids.items() if node in by_id}

    def _wait_nodes_status(self, indices: list[int], wanted: bool, timeout: float) -> None:
        """Wait until the nodes of sites `indices` are all online (`wanted`) or all not (sites
        of unknown status are not waited for)."""
        deadline = time.monotonic() + timeout
        while waiting := {i: status for i, status in self.node_statuses().items()
                          if i in indices and (status == "online") != wanted}:  # fmt: skip
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout:.0f} s, still: " + ", ".join(
                    f"site {i} {status}" for i, status in sorted(waiting.items())))  # fmt: skip
            time.sleep(1.0)

    def _wait_listening(self, name: str, port: int) -> None:
        if name in self.prefix:  # maybe another network namespace: look from the process
            wait_for_listen(self.processes[name].pid, port)
        else:
            wait_for_port(self.host_of(name), port)

    def stop_node(self, index: int) -> None:
        """Kill one site's SuperNode and ClientApp processes, as a machine failure would."""
        roots = set()
        for name in (f"supernode-{index}", f"clientapp-{index}"):
            process = self.processes.pop(name, None)
            if process is not None:
                roots.add(process.pid)
        kill_tree(roots, grace=0.0)

    def start_node(self, index: int) -> None:
        """Start a site again (the same client key and model; locked, the same node id, else a
        new one) and return once the SuperLink has it online (locked)."""
        self._launch_nodes([index])

    def _launch_nodes(self, indices: list[int]) -> None:
        # Locked, the SuperLink refuses a node whose killed session still counts as online (up
        # to two heartbeat intervals, 60 s), and the refused SuperNode exits: wait that out.
        self._wait_nodes_status(indices, wanted=False, timeout=180)
        for index in indices:
            self._launch(self._service(f"supernode-{index}"))
            self._wait_listening(f"supernode-{index}", self.node_ports[index])
            self._launch(self._service(f"clientapp-{index}"))
        self._wait_nodes_status(indices, wanted=True, timeout=180)

    def stop(self) -> None:
        kill_tree({p.pid for p in self.processes.values()})
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------------- run
    def _write_connection(self) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        ca = self.tls.ca if self.tls is not None else None
        if self.credentials is not None:
            ca = self.credentials.ca
        security = f'root-certificates = "{Path(ca).resolve()}"' if ca else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.host_of("superlink")}:{self.superlink_port}"\n{security}\n'
        )

    def flwr_run(
        self, run_config: str = "", timeout: float = 900, wait: bool = True
    ) -> subprocess.CompletedProcess[str] | subprocess.Popen[bytes]:
        """`flwr run . cluster --stream` with the cluster's own min_nodes first.

        One --run-config string: Flower merges repeated ones per top-level table, so a
        separate `server.min_nodes=N` would be lost if run_config sets any other `server.*`.
        """
        if "server.min_nodes" not in run_config:
            run_config = f"server.min_nodes={len(self.nodes)} {run_config}".strip()
        cmd = [
            *self.prefix.get("flwr", []),
            str(Path(sys.executable).parent / "flwr"),
            "run",
            str(ROOT),
            CONNECTION,
            "--stream",
            "--run-config",
            run_config,
        ]
        if not wait:
            log = (self.logs / "flwr-run.log").open("ab")
            return subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=log)
        done = subprocess.run(
            cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        status = self.run_status(done.stdout + done.stderr)
        if done.returncode == 0 and status != "finished:completed":
            # `flwr run --stream` exits 0 whatever became of the run (Flower 1.41)
            done.returncode = 1
            done.stderr += f"\nthe run ended as {status!r} (flwr ls)\n"
        return done

    def run_status(self, flwr_run_output: str) -> str:
        """The status `flwr ls` reports for the run that `flwr run` printed it started."""
        found = re.search(r"started run (\d+)", flwr_run_output)
        if found is None:
            return "not started"
        listed = self._flwr("ls", CONNECTION, "--run-id", found.group(1), "--format", "json")
        try:
            return str(json.loads(listed.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            return f"unknown ({listed.stdout.strip()[:200]})"


def absolute_data_paths(run_config: str, cwd: Path) -> str:
    """A --run-config string with relative data paths made absolute from `cwd`, where the
    user ran the command: Flower runs the ClientApps in other working directories."""
    if not run_config.strip():
        return run_config
    overrides = parse_config_args([run_config])
    for key in ("data.source", "data.root", "data.cache_dir"):
        if isinstance(overrides.get(key), str) and overrides[key]:
            overrides[key] = absolute_data_path(overrides[key], cwd, key == "data.source")
    return run_config_string(overrides)


def absolute_data_path(value: str, cwd: Path, is_source: bool = True) -> str:
    """`npz:rel.npz` -> `npz:/abs/rel.npz` (torchvision names stay); a plain relative path
    (data.root) -> absolute."""
    kind, sep, location = value.partition(":") if is_source else ("", "", value)
    if is_source and not sep:
        return value
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = (cwd / path).resolve()
    return f"{kind}:{path}" if is_source else str(path)


def _node_index(name: str, prefix: str) -> int | None:
    return int(name[len(prefix) :]) if name.startswith(prefix) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--models", default="lenet,vgg8,resnet10,resnet12,resnet18",
                        help="comma-separated; client i runs models[i mod len]")  # fmt: skip
    parser.add_argument("--data-source", default="", help="data.source for every client")
    parser.add_argument("--run-config", default="", help="flwr run --run-config overrides")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        help="TLS alone, no authentication: a folder with ca.crt, server.pem, "
        "server.key (default: locked, credentials made in the workdir)",
    )
    parser.add_argument("--insecure", action="store_true",
                        help="INSECURE laptop mode: no TLS, no authentication, no gateway; "
                        "anyone who reaches a port can run code on every site")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="logs and state (default: a temp folder)")
    args = parser.parse_args(argv)
    cwd = Path.cwd()
    source = absolute_data_path(args.data_source, cwd) if args.data_source else ""
    try:
        nodes = default_nodes(args.clients, args.models.split(","), source)
    except ValueError as err:
        parser.error(f"--clients: {err}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mh-pfedhn-cluster-"))
    tls = None
    if args.tls_dir:
        d = args.tls_dir.resolve()
        tls = TLS(str(d / "ca.crt"), str(d / "server.pem"), str(d / "server.key"))
    started = time.monotonic()
    if args.insecure:
        print("WARNING: insecure laptop mode: no TLS, no authentication", file=sys.stderr)
    with (
        exit_on_termination(),
        LocalCluster(nodes, workdir, tls=tls, insecure=args.insecure) as cluster,
    ):
        mode = "locked" if cluster.locked else ("TLS only" if tls else "INSECURE")
        print(f"cluster up ({mode}): SuperLink {cluster.host}:{cluster.superlink_port}, "
              f"{len(nodes)} SuperNodes, logs in {cluster.logs}", flush=True)  # fmt: skip
        done = cluster.flwr_run(absolute_data_paths(args.run_config, cwd))
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
    print(f"cluster stopped after {time.monotonic() - started:.0f} s; the run's outputs are in "
          f"{workdir / 'outputs'} (unless the run config sets server.output_root), logs in "
          f"{workdir / 'logs'}", flush=True)  # fmt: skip
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
