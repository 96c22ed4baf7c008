"""Which client key lives on which Flower node, who may hold a key, which nodes were refused.

Flower gives a restarted SuperNode a new node id; a client is recognised by the stable key it
reports, so a key moves to its new node and receives the output of its own embeddings again.
A key is bound to the first client that registered it: that client's query reply carries a
secret (`client-proof`), of which the server keeps only a salted scrypt hash (also in its
checkpoint); a later claim of the key with another secret is refused, and nothing of the key's
state is sent to that node or changed by it. With `bind_node_ids` (Flower's SuperNode
authentication on, so node ids are stable) a key also stays on the node id it came from.
Refused nodes are asked again after `requery_rounds`, then twice as long each time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from common import protocol
from server_app.server_state import RegistrationError

logger = logging.getLogger("flwr.mh_pfedhn")

MAX_REQUERY_ROUNDS = 64


def hash_proof(proof: str, salt: bytes | None = None) -> str:
    """'salt$hash' (hex) of a client's secret; the secret itself is never stored."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(proof.encode(), salt=salt, n=2**12, r=8, p=1, dklen=32)
    return f"{salt.hex()}${digest.hex()}"


def proof_matches(proof: str, stored: str) -> bool:
    salt, _, _ = stored.partition("$")
    return hmac.compare_digest(hash_proof(proof, bytes.fromhex(salt)), stored)


@dataclass
class Refusal:
    reason: str
    round: int  # when it was refused
    retry_round: int | None  # when to ask again (None: never)
    first_round: int  # when this node was first refused
    count: int = 1
    key: str | None = None  # the client key it claimed, if its reply said one


class ClientDirectory:
    def __init__(
        self, *, require_proof: bool = True, bind_node_ids: bool = False, requery_rounds: int = 1
    ) -> None:
        self.require_proof = require_proof
        self.bind_node_ids = bind_node_ids
        self.requery_rounds = requery_rounds
        self.node_of: dict[str, int] = {}  # client key -> its latest node id
        self.key_of: dict[int, str] = {}  # node id -> client key
        self.refused: dict[int, Refusal] = {}  # node id -> why, and when to ask again
        self.proofs: dict[str, str] = {}  # client key -> salted hash of its secret
        self.first_node: dict[str, int] = {}  # client key -> the node id it registered from

    def unknown(self, live: Iterable[int], server_round: int) -> list[int]:
        """Connected nodes to query: never seen (new or restarted SuperNodes), or refused
        and due to be asked again."""
        out = []
        for node in live:
            if node in self.key_of:
                continue
            refusal = self.refused.get(node)
            if refusal is None or (
                refusal.retry_round is not None and server_round >= refusal.retry_round
            ):
                out.append(node)
        return out

    def authorize(self, identity: protocol.Identity, node: int) -> None:
        """May this node hold this key? Raises RegistrationError (the node is refused)."""
        key = identity.client_key
        if identity.proof is None:
            if self.require_proof:
                raise RegistrationError(
                    f"client {key!r} sent no client-proof; give its SuperNode a state-dir "
                    "or a client-secret (or set server.require_client_proof=false)"
                )
            if key in self.proofs:
                raise RegistrationError(f"client {key!r} is bound to a proof; none was sent")
        elif key in self.proofs and not proof_matches(identity.proof, self.proofs[key]):
            logger.warning("node %d claims client key %r with another proof: refused as an "
                           "impostor", node, key)  # fmt: skip
            raise RegistrationError(
                f"client key {key!r} belongs to another client (its client-proof differs "
                "from the first one's); if this is that client restarted, it lost its secret: "
                "give its SuperNode a state-dir or a client-secret (in simulation: "
                "client.state_dir, which the sweep runner sets)"
            )
        if self.bind_node_ids and self.first_node.get(key, node) != node:
            raise RegistrationError(
                f"client key {key!r} is bound to node {self.first_node[key]} (server.bind_node_ids)"
            )

    def bind(self, identity: protocol.Identity, node: int) -> None:
        """Record that this (authorized, admitted) node now holds the key."""
        key = identity.client_key
        if identity.proof is not None and key not in self.proofs:
            self.proofs[key] = hash_proof(identity.proof)
        self.first_node.setdefault(key, node)
        old = self.node_of.get(key)
        if old is not None and old != node:
            self.key_of.pop(old, None)
            logger.info("client %s is back on node %d (was %d)", key, node, old)
        self.node_of[key] = node
        self.key_of[node] = key
        self.refused.pop(node, None)

    def refuse(self, node: int, reason: str, server_round: int, key: str | None = None) -> None:
        reason = protocol.printable(reason)  # it may quote what the client sent
        previous = self.refused.get(node)
        count = 1 if previous is None else previous.count + 1
        first = server_round if previous is None else previous.first_round
        retry = None
        if self.requery_rounds:
            wait = min(self.requery_rounds * 2 ** (count - 1), MAX_REQUERY_ROUNDS)
            retry = server_round + wait
        self.refused[node] = Refusal(reason, server_round, retry, first, count, key)
        logger.warning("node %d refused: %s", node, reason)

    def unadmitted(self) -> dict[str, dict[str, Any]]:
        """Nodes refused at registration and not admitted since (nor their key, from a node
        of its own: a fixed site restarts with a new node id), for the run's summary: a site
        that never joined must not go unnoticed in a run that went on without it."""
        return {
            str(node): {
                "count": r.count,
                "first_round": r.first_round,
                "last_round": r.round,
                "last_reason": r.reason,
            }
            | ({"key": r.key} if r.key is not None else {})
            for node, r in sorted(self.refused.items())
            if r.key is None or r.key not in self.node_of
        }

    def connected(self, live: Iterable[int]) -> list[str]:
        """Keys whose node is connected, sorted."""
        nodes = set(live)
        return sorted(k for k, n in self.node_of.items() if n in nodes)

    def state_dict(self) -> dict[str, Any]:
        """What binds keys across a restart (hashes only; node ids change on restart)."""
        return {"proofs": dict(self.proofs), "first_node": dict(self.first_node)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.proofs = dict(state.get("proofs", {}))
        self.first_node = {k: int(v) for k, v in state.get("first_node", {}).items()}
