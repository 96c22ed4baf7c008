"""The deployment topology, described once: docker/compose.yml and the local cluster use it.

One SuperLink, one SuperExec that runs the ServerApp, and per client a SuperNode plus a
SuperExec that runs its ClientApp processes, all in Flower's `process` isolation mode (each
app process is separate from the long-running Flower process, as containers need).
Each client has its own node config: a stable client key, its model, its data partition.

    python -m deployment.topology --clients 5 > docker/compose.yml   # regenerate compose
    python -m deployment.topology --clients 5 --tls > docker/compose.tls.yml   # its TLS overlay
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.models import PAPER_HETEROGENEOUS_MODELS
from deployment.credentials import Credentials

FLOWER_VERSION = "1.42.0"
SUPERLINK_PORT = 9091
SUPERNODE_PORT = 9094
GATEWAY_PORT = 9443
GATEWAY_IMAGE = "nginxinc/nginx-unprivileged:1.27"
GATEWAY_CONFIG = "/etc/nginx/nginx.conf"
APP_IMAGE = "mh-pfedhn:latest"
# flower-superexec, its ClientApp processes forked warm (deployment/warm_clientapp.py)
WARM_SUPEREXEC = "mh-pfedhn-superexec"
# How often a SuperExec asks for a new app process to start (Flower's default: 1 s); every
# exchange waits for it once (README, "Rounds at the speed of the network").
SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


@dataclass(frozen=True)
class Node:
    """One client site: the settings its SuperNode passes to its ClientApp."""

    index: int
    num_clients: int
    model: str
    client_key: str
    data_source: str = ""
    state_dir: str = ""  # where the ClientApp keeps BatchNorm statistics and local layers

    def node_config(self) -> str:
        pairs = [
            f'client-key="{self.client_key}"',
            f'model="{self.model}"',
            f"partition-id={self.index}",
            f"num-partitions={self.num_clients}",
        ]
        if self.data_source:
            pairs.append(f'data-source="{self.data_source}"')
        if self.state_dir:
            pairs.append(f'state-dir="{self.state_dir}"')
        return " ".join(pairs)


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    image: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TLS:
    """Certificate paths as each process sees them."""

    ca: str
    cert: str
    key: str


def default_nodes(num_clients: int, models: Sequence[str] = PAPER_HETEROGENEOUS_MODELS,
                  data_source: str = "", state_dir: str = "") -> list[Node]:  # fmt: skip
    return [
        Node(i, num_clients, models[i % len(models)], f"site-{i}", data_source, state_dir)
        for i in range(num_clients)
    ]


def _locked_tls(credentials: Credentials) -> TLS:
    return TLS(credentials.ca, credentials.link_cert, credentials.link_key)


def _security(tls: TLS | None, server: bool) -> list[str]:
    if tls is None:
        return ["--insecure"]
    if server:
        return ["--ssl-ca-certfile", tls.ca, "--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
    return ["--root-certificates", tls.ca]


def services(
    nodes: Sequence[Node],
    *,
    host_of=lambda name: name,
    superlink_port: int = SUPERLINK_PORT,
    supernode_port=lambda node: SUPERNODE_PORT,
    bind_host: str | Callable[[str], str] = "0.0.0.0",
    database: str = "/app/superlink.db",
    tls: TLS | None = None,
    credentials: Credentials | None = None,
    gateway_port: int = GATEWAY_PORT,
    gateway_config: str = GATEWAY_CONFIG,
) -> list[Service]:
    """Every process of the deployment, with the command line it runs.

    host_of(name): the address other services reach service `name` at; bind_host: the address
    the SuperLink and SuperNodes listen on (or a function of the service name).
    With `credentials` the deployment is locked (docs/deployment.md, "Locked by default"):
    TLS, SuperNode authentication, SuperExec secrets (one for the SuperLink side, one per
    site), and the sites reach the SuperLink only through the gateway (an nginx that passes
    the Fleet API alone). Without, `tls` alone or nothing (`--insecure`: a laptop only).
    """
    bind_of = bind_host if callable(bind_host) else lambda name: bind_host
    link = f"{host_of('superlink')}:{superlink_port}"
    if credentials is not None:
        tls = _locked_tls(credentials)
    link_secret = [] if credentials is None else ["--superexec-auth-secret-file",
                                                  credentials.link_secret]  # fmt: skip
    out = [
        Service(
            "superlink",
            [
                "flower-superlink",
                *_security(tls, server=True),
                "--isolation",
                "process",
                "--host",
                bind_of("superlink"),
                "--port",
                str(superlink_port),
                "--database",
                database,
                "--disable-runtime-dependency-installation",
                *([] if credentials is None else ["--enable-supernode-auth"]),
                *link_secret,
            ],
            f"flwr/superlink:{FLOWER_VERSION}",
        ),
        Service(
            "serverapp",
            [
                "flower-superexec",
                *_security(tls, server=False),
                "--runtime-api-address",
                link,
                *link_secret,
            ],
            APP_IMAGE,
            dict(SUPEREXEC_POLL),
        ),
    ]
    if credentials is not None:
        out.append(Service("gateway", ["nginx", "-e", "stderr", "-c", gateway_config, "-g",
                                       "daemon off;"], GATEWAY_IMAGE))  # fmt: skip
        link = f"{host_of('gateway')}:{gateway_port}"
    for node in nodes:
        name = f"supernode-{node.index}"
        port = supernode_port(node)
        site: list[str] = []
        if credentials is not None:
            site = ["--superexec-auth-secret-file", credentials.site_secret(node.index)]
        out.append(
            Service(
                name,
                [
                    "flower-supernode",
                    *_security(tls, server=False),
                    "--superlink",
                    link,
                    *([] if credentials is None else [
                        "--auth-supernode-private-key", credentials.node_key(node.index)]),
                    "--isolation",
                    "process",
                    "--host",
                    bind_of(name),
                    "--port",
                    str(port),
                    *site,
                    "--node-config",
                    node.node_config(),
                ],
                f"flwr/supernode:{FLOWER_VERSION}",
            )
        )  # fmt: skip
        out.append(
            Service(
                f"clientapp-{node.index}",
                [
                    WARM_SUPEREXEC,
                    "--insecure",  # the SuperNode's Runtime API is local to the site
                    "--runtime-api-address",
                    f"{host_of(name)}:{port}",
                    *site,  # only this site's SuperExec may claim its ClientApp tasks
                ],
                APP_IMAGE,
                dict(SUPEREXEC_POLL),
            )
        )
    return out


def compose_nodes(num_clients: int) -> list[Node]:
    """The sites of the compose files: data and client state at fixed container paths."""
    return default_nodes(num_clients, data_source="imagefolder:/data/cifar10", state_dir="/state")


# `flwr` inside the compose network: the connection "compose" in a config.toml it writes
# first; FLWR_SECURITY is its `insecure = true` or `root-certificates = "..."` line.
FLWR_CLI = (
    'printf \'[superlink]\\ndefault = "compose"\\n[superlink.compose]\\n'
    f'address = "superlink:{SUPERLINK_PORT}"\\n%s\\n\' "$$FLWR_SECURITY" '
    '> "$$FLWR_HOME/config.toml" && exec flwr "$$@"'
)


def compose_yaml(num_clients: int) -> str:
    """docker/compose.yml for num_clients sites (data under ./data, outputs in a volume, each
    site's client state in its own volume, so it outlives container restarts), on an internal
    network: nothing is published, `flwr` runs in the `flwr` service on that network."""
    nodes = compose_nodes(num_clients)
    lines = [
        "# Generated by `python -m deployment.topology --clients "
        f"{num_clients} > docker/compose.yml`;",
        "# tests/test_deployment.py checks it against deployment/topology.py; see README.md.",
        "# The network is internal (no ports published, no way out): run flwr in the network,",
        "#   docker-compose -f docker/compose.yml run --rm flwr run . --stream",
        "services:",
    ]
    for service in services(nodes):
        entrypoint, *args = service.argv
        lines += [f"  {service.name}:"]
        if service.image == APP_IMAGE:
            lines += [
                "    image: " + APP_IMAGE,
                "    build: {context: .., dockerfile: docker/Dockerfile}",
                f"    entrypoint: [{entrypoint}]",
            ]
        else:
            lines += [f"    image: {service.image}"]
        lines += [f"    command: {_flow_list(args)}"]
        if service.env:
            lines += [
                f"    environment: {_flow_list([f'{k}={v}' for k, v in service.env.items()])}"
            ]
        lines += ["    restart: unless-stopped"]
        if service.name == "superlink":
            # /app: owned by the image's user (uid 49999), so is the volume mounted there
            lines += ["    volumes: [superlink-state:/app]"]
        elif service.name == "serverapp":
            lines += [
                "    volumes: [outputs:/app/outputs]   # metrics and checkpoints",
                "    depends_on: [superlink]",
                "    # GPU for the hypernetwork (needs the NVIDIA container toolkit):",
                "    # deploy:",
                "    #   resources:",
                "    #     reservations:",
                "    #       devices: [{driver: nvidia, count: 1, capabilities: [gpu]}]",
            ]
        elif service.name.startswith("supernode-"):
            lines += ["    depends_on: [superlink]"]
        else:
            site = service.name.split("-")[1]
            lines += [
                f"    volumes: [../data:/data:ro, site-{site}-state:/state]   # data: give each "
                "site its own",
                f"    depends_on: [supernode-{site}]",
            ]
    lines += [
        "  flwr:   # the workstation: docker-compose run --rm flwr run . --stream --run-config ...",
        "    image: " + APP_IMAGE,
        "    profiles: [cli]   # not started by `up`",
        f"    entrypoint: [sh, -c, {_yaml_scalar(FLWR_CLI)}, flwr]",
        f"    environment: [FLWR_HOME=/tmp, {_yaml_scalar('FLWR_SECURITY=insecure = true')}]",
        "    depends_on: [superlink]",
        "networks:",
        "  default:",
        "    internal: true",
        "volumes:",
        "  superlink-state:",
        "  outputs:",
    ]
    lines += [f"  site-{node.index}-state:" for node in nodes]
    return "\n".join(lines) + "\n"


COMPOSE_TLS = TLS("/certs/ca.crt", "/certs/server.pem", "/certs/server.key")


def compose_tls_yaml(num_clients: int) -> str:
    """docker/compose.tls.yml: the overlay that turns compose.yml's links to the SuperLink
    into TLS (certificates from deployment/make_certs.sh in docker/certs)."""
    nodes = compose_nodes(num_clients)
    lines = [
        "# Generated by `python -m deployment.topology --clients "
        f"{num_clients} --tls > docker/compose.tls.yml`;",
        "# tests/test_deployment.py checks it against deployment/topology.py; see README.md.",
        "# TLS to the SuperLink. Certificates (the SuperLink image runs as uid 49999):",
        "#   deployment/make_certs.sh docker/certs superlink",
        "#   sudo chown 49999 docker/certs/server.key",
        "#   docker-compose -f docker/compose.yml -f docker/compose.tls.yml up -d",
        "# The ClientApps' SuperExecs keep --insecure: their SuperNode's port is site-local.",
        "services:",
    ]
    for service in services(nodes, tls=COMPOSE_TLS):
        if service.name.startswith("clientapp-"):
            continue
        # only the SuperLink gets the private key; the others need just the CA certificate
        mount = (
            "./certs:/certs:ro"
            if service.name == "superlink"
            else "./certs/ca.crt:/certs/ca.crt:ro"
        )
        lines += [
            f"  {service.name}:",
            f"    command: {_flow_list(service.argv[1:])}",
            f"    volumes: [{mount}]",
        ]
    security = f'FLWR_SECURITY=root-certificates = "{COMPOSE_TLS.ca}"'
    lines += [
        "  flwr:",
        f"    environment: [{_yaml_scalar(security)}]",
        f"    volumes: [./certs/ca.crt:{COMPOSE_TLS.ca}:ro]",
    ]
    return "\n".join(lines) + "\n"


def _flow_list(args: Sequence[str]) -> str:
    return "[" + ", ".join(_yaml_scalar(a) for a in args) + "]"


def _yaml_scalar(value: str) -> str:
    """Plain words stay bare; numbers and anything with ':' or quotes become quoted strings."""
    if (
        not value.isdigit()
        and value.replace("-", "").replace(".", "").replace("_", "").replace("/", "").isalnum()
    ):
        return value
    return "'" + value.replace("'", "''") + "'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3, help="number of client sites")
    parser.add_argument("--tls", action="store_true", help="print the TLS overlay instead")
    args = parser.parse_args()
    print((compose_tls_yaml if args.tls else compose_yaml)(args.clients), end="")


if __name__ == "__main__":
    main()
