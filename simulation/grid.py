"""A Flower `Grid` that hands each message straight to a ClientApp, in this process.

Each node has its own `Context` (its `state` persists across messages, as in Flower's
runtimes). The ClientApp receives a copy of the message, with the message id the grid gave it,
as a runtime delivers what it deserialised; the server's own Message objects stay untouched.
Used by the fast tests and by sweeps that do not need Flower's scheduler; the server and
client code are exactly those that `flwr run` executes.

Pushed messages wait until a pull asks for a reply that is not there yet; then every waiting
message is answered, together: the clients a round keeps in flight are trained as one batch
(by `BatchedGrid`), as a deployment's sites would train them at the same time.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.protocol import printable

SERVER_NODE_ID = 1
logger = logging.getLogger("flwr.mh_pfedhn")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with this many torch threads (None: leave it), as a Ray worker would."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class InProcessGrid(Grid):
    simulated = True  # `hypernetwork.in_flight: auto` keeps the authors' round here

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any],
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self._run_id = run_id
        self.contexts: dict[int, Context] = {}
        for index, node_config in enumerate(node_configs):
            node_id = 1000 + index
            self.contexts[node_id] = Context(
                run_id, node_id, dict(node_config), RecordDict(), dict(run_config)
            )
        self.disconnected: set[int] = set()
        self._queued: list[Message] = []  # pushed, not yet answered
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)
        # Messages built by the server need the identity a Flower runtime would provide.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 0

    @classmethod
    def simulation(
        cls, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any], **kwargs: Any
    ) -> InProcessGrid:
        """Nodes configured as Flower's simulation does it (partition-id, num-partitions)."""
        configs = [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        return cls(client_app, configs, run_config, **kwargs)

    def set_run(self, run: Any) -> None:  # the run is fixed at construction
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError("build Message objects directly")

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.disconnected]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if node in self.disconnected or node not in self.contexts:
                continue  # like an unreachable node: no reply arrives
            self._queued.append(_received(message, message_id))
        return ids

    def answer_queued(self) -> None:
        """Answer every message pushed and not yet answered (together)."""
        queued, self._queued = self._queued, []
        if queued:
            self.deliver(queued)

    def deliver(self, messages: list[Message]) -> None:
        """Hand each message to the ClientApp with its node's context, one after another."""
        for message in messages:
            self._answer(
                message, lambda m=message: self.client_app(m, self.contexts[m.metadata.dst_node_id])
            )

    def _answer(self, message: Message, handle) -> None:
        """handle() is the reply; an exception becomes an error reply, as in the runtimes:
        the reply says what was raised, the traceback goes to the client's log."""
        try:
            reply = handle()
        except Exception as err:
            node = message.metadata.dst_node_id
            lines = traceback.format_exc().splitlines()  # the client's text: marked, escaped
            shown = "\n".join(f"  node {node} | {printable(line)}" for line in lines)
            logger.error("ClientApp on node %d raised:\n%s", node, shown)
            reason = f"{type(err).__name__}: {err}"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        self._replies[message.metadata.message_id] = reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        if any(i not in self._replies for i in message_ids):
            self.answer_queued()
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _received(message: Message, message_id: str) -> Message:
    """The message as the destination node would receive it: its own copy, with an id."""
    sent = message.metadata
    metadata = Metadata(
        run_id=sent.run_id,
        message_id=message_id,
        src_node_id=sent.src_node_id,
        dst_node_id=sent.dst_node_id,
        reply_to_message_id="",
        group_id=sent.group_id,
        created_at=sent.created_at or time.time(),
        ttl=sent.ttl,
        message_type=sent.message_type,
    )
    return Message(metadata=metadata, content=copy.deepcopy(message.content))
