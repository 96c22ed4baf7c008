"""One exchange of messages with clients: push them, pull the replies as they arrive.

Flower's `Grid.send_and_receive` sleeps a fixed 3 s between pulls in deployment (HttpGrid);
this waits `pull_interval` seconds, 1.5x longer after each pull that brought nothing (up to
`max_pull_interval`: few idle calls while clients train) and `pull_interval` again after one
that brought a reply. Each reply goes to a callback the moment it arrives, so the server can
check it while other clients still train. Replies are keyed by the client key of the message
they answer (through the ids `push_messages` returned), never by the node that claims to have
sent them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

logger = logging.getLogger("flwr.mh_pfedhn")


class Exchange:
    GROWTH = 1.5

    def __init__(self, grid: Grid, pull_interval: float = 0.05, max_pull_interval: float = 0.5):
        self.grid = grid
        self.pull_interval = pull_interval
        self.max_pull_interval = max(max_pull_interval, pull_interval)

    def run(
        self,
        messages: Mapping[str, Message],
        timeout: float,
        on_reply: Callable[[str, Message], None] | None = None,
    ) -> tuple[dict[str, Message], list[str]]:
        """Send each key's message; return (replies by key, keys that did not answer in time).

        `on_reply(key, reply)` runs for each reply as it arrives.
        """
        keys: Sequence[str] = list(messages)
        if not keys:
            return {}, []
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        waiting = {mid: key for mid, key in zip(ids, keys, strict=False) if mid}
        replies: dict[str, Message] = {}
        deadline = time.monotonic() + timeout
        wait = self.pull_interval
        while waiting:
            arrived = list(self.grid.pull_messages(list(waiting)))
            for reply in arrived:
                key = waiting.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    logger.warning("ignored a reply to no message of this exchange")
                    continue
                replies[key] = reply
                if on_reply is not None:
                    on_reply(key, reply)
            if not waiting or time.monotonic() >= deadline:
                break
            if arrived:
                wait = self.pull_interval
                continue
            time.sleep(min(wait, max(deadline - time.monotonic(), 0.0)))
            wait = min(wait * self.GROWTH, self.max_pull_interval)
        missing = sorted(set(keys) - set(replies))
        return replies, missing
