"""The deployment topology, described once: docker/compose.yml and the local cluster use it.

One SuperLink, one SuperExec that runs the ServerApp, and per client a SuperNode plus a
SuperExec that runs its ClientApp processes, all in Flower's `process` isolation mode (each
app process is separate from the long-running Flower process, as containers need).
Each client has its own node config: a stable client key, its model, its data partition.

    python -m deployment.topology --clients 5 > docker/compose.yml   # regenerate compose (locked)
    python -m deployment.topology --gateway-config > docker/gateway/nginx.conf
    python -m deployment.topology --clients 5 --insecure-laptop > docker/compose.insecure-laptop.yml
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import yaml

from common.models import PAPER_HETEROGENEOUS_MODELS
from deployment.credentials import Credentials
from deployment.gateway import nginx_config

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
    if num_clients < 1:
        raise ValueError(f"a federation needs at least one client site, not {num_clients}")
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
    host_of: Callable[[str], str] = lambda name: name,
    superlink_port: int = SUPERLINK_PORT,
    supernode_port: Callable[[Node], int] = lambda node: SUPERNODE_PORT,
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


# each site's network is a /24 of 172.30.0.0/16 from 172.30.10.0 (site_address)
MAX_COMPOSE_SITES = 256 - 10


def compose_nodes(num_clients: int) -> list[Node]:
    """The sites of the compose files: data and client state at fixed container paths."""
    if num_clients > MAX_COMPOSE_SITES:
        raise ValueError(f"the compose file has room for {MAX_COMPOSE_SITES} sites (a /24 "
                         f"network each), not {num_clients}")  # fmt: skip
    return default_nodes(num_clients, data_source="imagefolder:/data/cifar10", state_dir="/state")


# The compose files' credentials, as the containers see them: public certificates under
# /certs, private keys and secrets as compose secrets (python -m deployment.credentials).
COMPOSE_CREDENTIALS = Credentials(
    ca="/certs/ca.crt",
    link_cert="/certs/superlink.pem",
    link_key="/run/secrets/superlink_key",
    gateway_cert="/certs/gateway.pem",
    gateway_key="/run/secrets/gateway_key",
    link_secret="/run/secrets/link_secret",
    site_secret_pattern="/run/secrets/site{index}_secret",
    node_key_pattern="/run/secrets/site{index}_key",
)
SECRET_FILES = {"superlink_key": "superlink.key", "gateway_key": "gateway.key",
                "link_secret": "link.secret"}  # fmt: skip
IMAGE_USER = "49999:49999"  # the Flower images' `app` user; the private files belong to it
HARDENED = [
    f'    user: "{IMAGE_USER}"',
    "    cap_drop: [ALL]",
    "    security_opt: ['no-new-privileges:true']",
    "    restart: unless-stopped",
]


def site_address(index: int) -> str:
    """Site `index`'s SuperNode on its own network (one /24 per site)."""
    return f"172.30.{10 + index}.2"


# `flwr` inside the compose network: the connection "compose" in a config.toml it writes
# first; FLWR_SECURITY is its `insecure = true` or `root-certificates = "..."` line.
FLWR_CLI = (
    'printf \'[superlink]\\ndefault = "compose"\\n[superlink.compose]\\n'
    f'address = "superlink:{SUPERLINK_PORT}"\\n%s\\n\' "$$FLWR_SECURITY" '
    '> "$$FLWR_HOME/config.toml" && exec flwr "$$@"'
)


def gateway_conf() -> str:
    """docker/gateway/nginx.conf: the compose gateway (deployment/gateway.py)."""
    c = COMPOSE_CREDENTIALS
    return nginx_config(listen=f"0.0.0.0:{GATEWAY_PORT}", upstream=f"superlink:{SUPERLINK_PORT}",
                        upstream_name="superlink", cert=c.gateway_cert, key=c.gateway_key,
                        ca=c.ca, runtime_dir="/tmp")  # fmt: skip


def compose_yaml(num_clients: int, insecure: bool = False) -> str:
    """docker/compose.yml, locked (docs/deployment.md, "Locked by default"): the SuperLink
    and the ServerApp on the `link` network with the operator's `flwr`; the sites' SuperNodes
    on `fleet`, where only the gateway (Fleet API only) reaches the SuperLink; each site's
    ClientApp SuperExec on that site's own network with its SuperNode; TLS, SuperNode keys
    registered by the operator, a SuperExec secret per trust domain; every container a
    non-root user without capabilities; no network with a way out. `insecure`: the laptop
    file, docker/compose.insecure-laptop.yml (one network, no TLS, no authentication)."""
    nodes = compose_nodes(num_clients)
    creds = None if insecure else COMPOSE_CREDENTIALS
    site_of = {f"supernode-{n.index}": site_address(n.index) for n in nodes}
    made = services(
        nodes,
        credentials=creds,
        host_of=(lambda name: name) if insecure else (lambda name: site_of.get(name, name)),
        bind_host=(lambda name: "0.0.0.0") if insecure else (
            lambda name: site_of.get(name, "0.0.0.0")),
    )  # fmt: skip
    if insecure:
        lines = [
            "# Generated by `python -m deployment.topology --clients "
            f"{num_clients} --insecure-laptop > docker/compose.insecure-laptop.yml`.",
            "# INSECURE LAPTOP MODE: no TLS, no authentication, one network. Any container on",
            "# it can start runs (code on every site), read every site's messages and answer for",
            "# them. For a laptop only; deployments use docker/compose.yml (locked).",
            "#   docker-compose -f docker/compose.insecure-laptop.yml run --rm flwr run . --stream",
        ]
    else:
        lines = [
            "# Generated by `python -m deployment.topology --clients "
            f"{num_clients} > docker/compose.yml`;",
            "# tests/test_deployment.py checks it against deployment/topology.py. Locked: see",
            "# docs/deployment.md. Once: credentials (private files owned by the images' user),",
            f"#   python -m deployment.credentials docker/secrets --sites {num_clients} "
            "--link-host superlink --gateway-host gateway --owner 49999",
            "# then the SuperLink side, the sites' keys registered by the operator, the sites:",
            "#   docker-compose -f docker/compose.yml up -d superlink serverapp gateway",
            "#   docker-compose -f docker/compose.yml run --rm flwr supernode register "
            "/keys/site-0.pub   # each site",
            "#   docker-compose -f docker/compose.yml up -d",
            "#   docker-compose -f docker/compose.yml run --rm flwr run . --stream",
        ]
    lines.append("services:")
    for service in made:
        lines += _compose_service(service, creds)
    lines += _flwr_service(nodes, creds)
    lines += _compose_networks(nodes, insecure)
    lines += ["volumes:", "  superlink-state:", "  outputs:"]
    lines += [f"  site-{node.index}-state:" for node in nodes]
    if creds is not None:
        lines.append("secrets:")
        for name, file in SECRET_FILES.items():
            lines.append(f"  {name}: {{file: ./secrets/{file}}}")
        for node in nodes:
            i = node.index
            lines.append(f"  site{i}_secret: {{file: ./secrets/site-{i}.secret}}")
            lines.append(f"  site{i}_key: {{file: ./secrets/site-{i}.key}}")
    return "\n".join(lines) + "\n"


def _compose_service(service: Service, creds: Credentials | None) -> list[str]:
    """One service of compose.yml: its image, command, user, networks, secrets, mounts."""
    entrypoint, *args = service.argv
    name = service.name
    lines = [f"  {name}:"]
    if service.image == APP_IMAGE:
        lines += [
            "    image: " + APP_IMAGE,
            "    build: {context: .., dockerfile: docker/Dockerfile}",
            f"    entrypoint: [{entrypoint}]",
        ]
    else:
        lines += [f"    image: {service.image}"]
    if name == "gateway":  # nginx images run their command as given (their entrypoint: a shim)
        args = service.argv
    lines += [f"    command: {_flow_list(args)}"]
    if service.env:
        lines += [f"    environment: {_flow_list([f'{k}={v}' for k, v in service.env.items()])}"]
    lines += HARDENED if creds is not None else ["    restart: unless-stopped"]
    index = _site(name)
    secrets: list[str] = []
    certs: list[str] = []
    volumes: list[str] = []
    if name == "superlink":
        secrets, certs = ["superlink_key", "link_secret"], ["ca.crt", "superlink.pem"]
        volumes = ["superlink-state:/app"]  # owned by the image's user, as the volume
        networks = ["link"]
    elif name == "serverapp":
        secrets, certs = ["link_secret"], ["ca.crt"]
        volumes = ["outputs:/app/outputs"]
        networks = ["link"]
    elif name == "gateway":
        secrets, certs = ["gateway_key"], ["ca.crt", "gateway.pem"]
        volumes = [f"./gateway/nginx.conf:{GATEWAY_CONFIG}:ro"]
        networks = ["link", "fleet"]
    elif name.startswith("supernode-"):
        secrets, certs = [f"site{index}_key", f"site{index}_secret"], ["ca.crt"]
        networks = ["fleet", f"site-{index}"]
    else:
        secrets = [f"site{index}_secret"]
        volumes = ["../data:/data:ro", f"site-{index}-state:/state"]
        networks = [f"site-{index}"]
    if creds is not None:
        volumes += [f"./secrets/{c}:/certs/{c}:ro" for c in certs]
        if secrets:
            lines.append(f"    secrets: {_flow_list(secrets)}")
    if volumes:
        lines.append(f"    volumes: {_flow_list(volumes)}")
    if creds is not None:
        if name.startswith("supernode-"):
            lines += ["    networks:", "      fleet: {}",
                      f"      site-{index}: {{ipv4_address: {site_address(index)}}}"]  # fmt: skip
        else:
            lines.append(f"    networks: {_flow_list(networks)}")
    depends = {"serverapp": "superlink", "gateway": "superlink"}.get(name)
    if name.startswith("supernode-"):
        depends = "superlink" if creds is None else "gateway"
    elif name.startswith("clientapp-"):
        depends = f"supernode-{index}"
    if depends:
        lines.append(f"    depends_on: [{depends}]")
    if name == "serverapp":
        lines += ["    # GPU for the hypernetwork (needs the NVIDIA container toolkit):",
                  "    # deploy: {resources: {reservations: {devices: [{driver: nvidia, count: 1, "
                  "capabilities: [gpu]}]}}}"]  # fmt: skip
    return lines


def _flwr_service(nodes: Sequence[Node], creds: Credentials | None) -> list[str]:
    """The operator's `flwr`, on the link network (docker-compose run --rm flwr ...)."""
    security = "insecure = true" if creds is None else f'root-certificates = "{creds.ca}"'
    lines = [
        "  flwr:   # the operator: docker-compose run --rm flwr run . --stream --run-config ...",
        "    image: " + APP_IMAGE,
        "    profiles: [cli]   # not started by `up`",
        f"    entrypoint: [sh, -c, {_yaml_scalar(FLWR_CLI)}, flwr]",
        f"    environment: [FLWR_HOME=/tmp, {_yaml_scalar('FLWR_SECURITY=' + security)}]",
        "    depends_on: [superlink]",
    ]
    if creds is not None:
        keys = [f"./secrets/site-{n.index}.key.pub:/keys/site-{n.index}.pub:ro" for n in nodes]
        lines += [f'    user: "{IMAGE_USER}"',
                  f"    volumes: {_flow_list(['./secrets/ca.crt:/certs/ca.crt:ro', *keys])}",
                  "    networks: [link]"]  # fmt: skip
    return lines


def _compose_networks(nodes: Sequence[Node], insecure: bool) -> list[str]:
    """Internal networks only (no way out); locked: the link side, the fleet side, one per
    site."""
    if insecure:
        return ["networks:", "  default:", "    internal: true"]
    lines = ["networks:", "  link: {internal: true}   # SuperLink, ServerApp, gateway, operator",
             "  fleet: {internal: true}   # the gateway and the SuperNodes: publish the gateway "
             f"({GATEWAY_PORT}) for remote sites"]  # fmt: skip
    for node in nodes:
        subnet = site_address(node.index).rsplit(".", 1)[0] + ".0/24"
        lines.append(f"  site-{node.index}: {{internal: true, ipam: {{config: [{{subnet: "
                     f"{subnet}}}]}}}}")  # fmt: skip
    return lines


def _site(name: str) -> int | None:
    head, _, tail = name.rpartition("-")
    return int(tail) if head in ("supernode", "clientapp") else None


def _flow_list(args: Sequence[str]) -> str:
    return "[" + ", ".join(_yaml_scalar(a) for a in args) + "]"


def _yaml_scalar(value: str) -> str:
    """Plain words stay bare; what YAML would read as another type (0.1, -1, true, off) and
    anything with ':' or quotes become quoted strings."""
    word = value.replace("-", "").replace(".", "").replace("_", "").replace("/", "").isalnum()
    if word and isinstance(yaml.safe_load(value), str):
        return value
    return "'" + value.replace("'", "''") + "'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3, help="number of client sites")
    parser.add_argument(
        "--insecure-laptop",
        action="store_true",
        help="print the INSECURE laptop file (no TLS, no authentication)",
    )
    parser.add_argument(
        "--gateway-config",
        action="store_true",
        help="print the gateway's nginx.conf (docker/gateway/nginx.conf)",
    )
    args = parser.parse_args()  # fmt: skip
    if args.gateway_config:
        print(gateway_conf(), end="")
        return
    try:
        print(compose_yaml(args.clients, insecure=args.insecure_laptop), end="")
    except ValueError as err:
        parser.error(f"--clients: {err}")


if __name__ == "__main__":
    main()
