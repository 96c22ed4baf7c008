"""Run the real ServerApp logic against real ClientApps in one process, without Ray.

`InProcessGrid` is a Flower `Grid` that hands each message straight to the ClientApp with
that node's own `Context` (its `state` persists across messages, as in Flower's runtimes).
Used by the fast tests and by sweeps that do not need Flower's scheduler; the server and
client code are exactly those that `flwr run` executes.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


class InProcessGrid(Grid):
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
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)
        # Messages built by the server need the identity a Flower runtime would provide.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 0

    @classmethod
    def simulation(
        cls, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any]
    ) -> InProcessGrid:
        """Nodes configured as Flower's simulation does it (partition-id, num-partitions)."""
        configs = [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        return cls(client_app, configs, run_config)

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
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if node in self.disconnected or node not in self.contexts:
                continue  # like an unreachable node: no reply arrives
            try:
                reply = self.client_app(message, self.contexts[node])
            except Exception as err:  # the runtimes turn ClientApp exceptions into error replies
                reason = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message
                )
            self._replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
