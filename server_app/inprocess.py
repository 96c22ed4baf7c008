"""Run the real ServerApp logic against real ClientApps in one process, without Ray.

`InProcessGrid` is a Flower `Grid` that hands each message straight to the ClientApp with
that node's own `Context` (its `state` persists across messages, as in Flower's runtimes).
Used by the fast tests and by sweeps that do not need Flower's scheduler; the server and
client code are exactly those that `flwr run` executes.
"""

from __future__ import annotations

import contextlib
import itertools
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


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
        ids, delivered = [], []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if node in self.disconnected or node not in self.contexts:
                continue  # like an unreachable node: no reply arrives
            delivered.append(message)
        self.deliver(delivered)
        return ids

    def deliver(self, messages: list[Message]) -> None:
        """Hand each message to the ClientApp with its node's context, one after another."""
        for message in messages:
            self._answer(
                message, lambda m=message: self.client_app(m, self.contexts[m.metadata.dst_node_id])
            )

    def _answer(self, message: Message, handle) -> None:
        """handle() is the reply; an exception becomes an error reply, as in the runtimes."""
        try:
            reply = handle()
        except Exception as err:
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        self._replies[message.metadata.message_id] = reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


class BatchedGrid(InProcessGrid):
    """`engine: batched`: train messages whose clients train plainly (cross-entropy on the
    whole model) run together (`client_app/batched.py`): with vmap per (type, architecture),
    else all of one type client by client, `workers` at a time; everything else goes one by
    one as in InProcessGrid. Messages are prepared and answered by this project's ClientApp
    code (`client_app.app.TrainJob`), so only the arithmetic is batched; it serves that
    ClientApp, not an arbitrary one."""

    train_threads: int | None = None  # torch threads per client
    workers: int = 1  # clients trained at once without vmap (the runner: cores / threads)
    vectorize: bool | None = None  # None: vmap on CUDA only (see uses_vmap)

    def deliver(self, messages: list[Message]) -> None:
        from client_app.app import TrainJob, open_session
        from client_app.batched import train_together, uses_vmap
        from common.protocol import TRAIN, TRAIN_GLOBAL

        groups: dict[tuple[str, str], list[TrainJob]] = {}
        rest = []
        for message in messages:
            kind = message.metadata.message_type
            if kind not in (TRAIN, TRAIN_GLOBAL) or "arrays" not in message.content:
                rest.append(message)
                continue
            context = self.contexts[message.metadata.dst_node_id]
            try:
                job = TrainJob.prepare(open_session(context), message, kind == TRAIN_GLOBAL)
            except Exception:
                rest.append(message)  # the ClientApp reports the same error itself
                continue
            if job.plain:
                device = next(job.model.parameters()).device
                vmapped = uses_vmap(device, self.vectorize)
                groups.setdefault((kind, job.architecture if vmapped else ""), []).append(job)
            else:
                self._answer(message, lambda job=job: job.reply(job.run()))
        for jobs in groups.values():
            try:
                with torch_threads(self.train_threads):
                    losses = train_together(
                        [job.model for job in jobs],
                        [(job.session.data.x_train, job.session.data.y_train) for job in jobs],
                        jobs[0].session.settings(),
                        [job.generator for job in jobs],
                        self.vectorize,
                        self.workers,
                    )
            except Exception as err:
                for job in jobs:
                    self._answer(job.msg, lambda err=err: _raise(err))
                continue
            for job, loss in zip(jobs, losses, strict=True):
                self._answer(job.msg, lambda job=job, loss=loss: job.reply(loss))
        super().deliver(rest)


def _raise(err: Exception) -> Message:
    raise err
