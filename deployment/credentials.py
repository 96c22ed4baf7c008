"""The credentials of a locked deployment (docs/deployment.md, "Locked by default").

Flower's own mechanisms, nothing of ours on the wire: TLS certificates from one CA
(deployment/make_certs.sh) for the SuperLink and for the gateway that is the only door the
sites have (deployment/gateway.py); a SuperExec secret for the SuperLink side and one per site
(Flower's HMAC-signed task claims, `--superexec-auth-secret-file`); and per site an EC key
pair in OpenSSH format whose public half the operator registers (`flwr supernode register`)
before that site may connect (`--enable-supernode-auth`).

    python -m deployment.credentials docker/secrets --sites 3 --link-host superlink \\
        --gateway-host gateway

writes them with private files 0600 (the CA key stays in the folder: nothing mounts it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

MAKE_CERTS = Path(__file__).with_name("make_certs.sh")
SECRET_BYTES = 32


@dataclass(frozen=True)
class Credentials:
    """Where each credential is, as the processes see it (`{index}`: a site's number)."""

    ca: str  # the CA certificate: everyone verifies with it
    link_cert: str
    link_key: str
    gateway_cert: str
    gateway_key: str
    link_secret: str  # the SuperLink's and the ServerApp SuperExec's shared secret
    site_secret_pattern: str
    node_key_pattern: str  # the site's private key; its public key is this + ".pub"

    def site_secret(self, index: int) -> str:
        return self.site_secret_pattern.format(index=index)

    def node_key(self, index: int) -> str:
        return self.node_key_pattern.format(index=index)

    def node_public_key(self, index: int) -> str:
        return self.node_key(index) + ".pub"

    @classmethod
    def in_folder(cls, folder: str | Path) -> Credentials:
        """The file names `make_credentials` writes, under `folder`."""
        f = Path(folder)
        return cls(
            ca=str(f / "ca.crt"),
            link_cert=str(f / "superlink.pem"),
            link_key=str(f / "superlink.key"),
            gateway_cert=str(f / "gateway.pem"),
            gateway_key=str(f / "gateway.key"),
            link_secret=str(f / "link.secret"),
            site_secret_pattern=str(f / "site-{index}.secret"),
            node_key_pattern=str(f / "site-{index}.key"),
        )


def _certificate(folder: Path, name: str, hosts: Sequence[str]) -> None:
    """`name`.pem / `name`.key for these hosts, signed by the folder's CA (made if absent)."""
    made = subprocess.run([str(MAKE_CERTS), str(folder), *hosts], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if made.returncode != 0:
        raise RuntimeError(f"make_certs.sh failed: {made.stderr.strip()[-2000:]}")
    (folder / "server.pem").replace(folder / f"{name}.pem")
    (folder / "server.key").replace(folder / f"{name}.key")


def _private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def node_key_pair(path: Path) -> None:
    """An EC P-384 key in OpenSSH format at `path` (0600), its public key at `path`.pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    _private(path, key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)  # fmt: skip
    path.with_name(path.name + ".pub").write_bytes(public + b"\n")


def make_credentials(
    folder: str | Path,
    sites: int,
    link_hosts: Sequence[str],
    gateway_hosts: Sequence[str],
) -> Credentials:
    """Every credential of a deployment with `sites` sites, in `folder` (0700). The CA is
    kept if the folder has one, so certificates already handed out stay valid; secrets and
    keys that exist are kept too (a site's registered key must not change)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    creds = Credentials.in_folder(out)
    _certificate(out, "superlink", link_hosts)
    _certificate(out, "gateway", gateway_hosts)
    for index in range(sites):
        if not Path(creds.site_secret(index)).exists():
            _private(Path(creds.site_secret(index)), os.urandom(SECRET_BYTES))
        if not Path(creds.node_key(index)).exists():
            node_key_pair(Path(creds.node_key(index)))
    if not Path(creds.link_secret).exists():
        _private(Path(creds.link_secret), os.urandom(SECRET_BYTES))
    return creds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument(
        "--link-host",
        action="append",
        required=True,
        help="a name or address the SuperLink is reached at (repeatable)",
    )
    parser.add_argument(
        "--gateway-host",
        action="append",
        required=True,
        help="a name or address the sites reach the gateway at (repeatable)",
    )
    parser.add_argument(
        "--owner",
        type=int,
        default=None,
        help="chown every file written to this uid (the images' user: 49999)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.sites < 1:
        parser.error("--sites must be at least 1")
    make_credentials(args.folder, args.sites, args.link_host, args.gateway_host)
    if args.owner is not None:
        for path in args.folder.iterdir():
            os.chown(path, args.owner, -1)
    print(f"wrote {args.folder}/: ca.crt (public), superlink.pem/.key, gateway.pem/.key, "
          f"link.secret, site-N.secret, site-N.key and site-N.key.pub for {args.sites} "
          "sites (private files 0600). Register each site-N.key.pub with `flwr supernode "
          "register`; ca.key never leaves this folder.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
