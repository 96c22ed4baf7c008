"""Which client key lives on which Flower node, and which nodes were refused.

Flower gives a restarted SuperNode a new node id; a client is recognised by the stable key it
reports, so a key moves to its new node and receives the output of its own embeddings again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger("flwr.mh_pfedhn")


class ClientDirectory:
    def __init__(self) -> None:
        self.node_of: dict[str, int] = {}  # client key -> its latest node id
        self.key_of: dict[int, str] = {}  # node id -> client key
        self.refused: dict[int, str] = {}  # node id -> why it was refused

    def unknown(self, live: Iterable[int]) -> list[int]:
        """Connected nodes never seen: new or restarted SuperNodes, to be queried."""
        return [n for n in live if n not in self.key_of and n not in self.refused]

    def bind(self, key: str, node: int) -> None:
        old = self.node_of.get(key)
        if old is not None and old != node:
            self.key_of.pop(old, None)
            logger.info("client %s is back on node %d (was %d)", key, node, old)
        self.node_of[key] = node
        self.key_of[node] = key

    def refuse(self, node: int, reason: str) -> None:
        self.refused[node] = reason
        logger.warning("node %d refused: %s", node, reason)

    def connected(self, live: Iterable[int]) -> list[str]:
        """Keys whose node is connected, sorted."""
        nodes = set(live)
        return sorted(k for k, n in self.node_of.items() if n in nodes)
