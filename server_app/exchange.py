"""Exchanges of messages with clients: push them, pull the replies as they arrive.

Flower's `Grid.send_and_receive` sleeps a fixed 3 s between pulls in deployment (HttpGrid);
this waits `pull_interval` seconds, 1.5x longer after each pull that brought nothing (up to
`max_pull_interval`: few idle calls while clients train) and `pull_interval` again after one
that brought a reply. Replies are keyed by the client key of the message
they answer (through the ids `push_messages` returned), never by the node that claims to have
sent them.

Posting and collecting are separate steps (`post`, `collect`), so several exchanges can be
open at once: the round loop keeps `hypernetwork.in_flight` clients training while it waits
for the reply it needs next (docs/concepts/schedules.md, "Clients in flight"). `collect`
pulls only its own messages' replies; the others wait in the SuperLink (or the in-process
grid) until their exchange is collected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

logger = logging.getLogger("flwr.mh_pfedhn")


@dataclass
class Posted:
    """Messages pushed and not yet collected: which client each message id is for, and
    when they left (the timeout counts from then)."""

    keys: list[str]
    waiting: dict[str, str]  # message id -> client key
    at: float  # time.monotonic() when pushed


class Exchange:
    GROWTH = 1.5

    def __init__(
        self, grid: Grid, pull_interval: float = 0.05, max_pull_interval: float = 0.5
    ) -> None:
        self.grid = grid
        self.pull_interval = pull_interval
        self.max_pull_interval = max(max_pull_interval, pull_interval)

    def post(self, messages: Mapping[str, Message]) -> Posted:
        """Push each key's message now."""
        keys = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in keys])) if keys else []
        waiting = {mid: key for mid, key in zip(ids, keys, strict=False) if mid}
        return Posted(keys, waiting, time.monotonic())

    def collect(self, posted: Posted, timeout: float) -> tuple[dict[str, Message], list[str]]:
        """Pull the posted messages' replies until all arrived or `timeout` seconds after they
        were pushed; return (replies by key, keys that did not answer in time)."""
        waiting = dict(posted.waiting)
        replies: dict[str, Message] = {}
        deadline = posted.at + timeout
        wait = self.pull_interval
        while waiting:
            arrived = list(self.grid.pull_messages(list(waiting)))
            for reply in arrived:
                key = waiting.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    logger.warning("ignored a reply to no message of this exchange")
                    continue
                replies[key] = reply
            if not waiting or time.monotonic() >= deadline:
                break
            if arrived:
                wait = self.pull_interval
                continue
            time.sleep(min(wait, max(deadline - time.monotonic(), 0.0)))
            wait = min(wait * self.GROWTH, self.max_pull_interval)
        missing = sorted(set(posted.keys) - set(replies))
        return replies, missing

    def run(
        self, messages: Mapping[str, Message], timeout: float
    ) -> tuple[dict[str, Message], list[str]]:
        """Post the messages and collect their replies (one exchange on its own)."""
        return self.collect(self.post(messages), timeout)
