"""One exchange of messages with clients: push them, pull the replies as they arrive.

Flower's `Grid.send_and_receive` sleeps a fixed 3 s between pulls in deployment (HttpGrid);
this pulls every `pull_interval` seconds instead, and hands each reply to a callback the moment
it arrives, so the server can check it while other clients still train. Replies are keyed by
the client key of the message they answer (through the ids `push_messages` returned), never
by the node that claims to have sent them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

logger = logging.getLogger("flwr.mh_pfedhn")


class Exchange:
    def __init__(self, grid: Grid, pull_interval: float = 0.05) -> None:
        self.grid = grid
        self.pull_interval = pull_interval

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
            if not arrived:
                time.sleep(min(self.pull_interval, max(deadline - time.monotonic(), 0.0)))
        missing = sorted(set(keys) - set(replies))
        return replies, missing
