"""`engine: batched`: the in-process grid that trains many clients' messages together."""

from __future__ import annotations

from typing import Any

from flwr.app import Message

from client_app.app import client_method
from client_app.batched import train_together, uses_vmap
from client_app.method import TrainJob
from client_app.session import open_session
from simulation.grid import InProcessGrid, torch_threads


class BatchedGrid(InProcessGrid):
    """`engine: batched`: messages whose clients train plainly (cross-entropy on the whole
    model) run together (`client_app/batched.py`): with vmap per (type, architecture), else
    all of one type client by client, `workers` at a time; everything else goes one by one
    as in InProcessGrid. Messages are prepared and answered by this project's client methods
    (`TrainJob`), so only the arithmetic is batched; it serves this project's ClientApp."""

    def __init__(
        self,
        *args: Any,
        train_threads: int | None = None,
        workers: int = 1,
        vectorize: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_threads = train_threads  # torch threads per client
        self.workers = workers  # clients trained at once without vmap (cores / threads)
        self.vectorize = vectorize  # None: vmap on CUDA only (see uses_vmap)

    def deliver(self, messages: list[Message]) -> None:
        groups: dict[tuple[str, str], list[TrainJob]] = {}
        rest = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                with torch_threads(self.train_threads):  # as the ClientApp's (it may evaluate)
                    session = open_session(context)
                    job = client_method(session.cfg.method).train_job(session, message)
            except Exception:
                job = None  # the ClientApp reports the same error itself
            if job is None:
                rest.append(message)
            elif job.plain:
                kind = message.metadata.message_type
                vmapped = uses_vmap(next(job.model.parameters()).device, self.vectorize)
                groups.setdefault((kind, job.architecture if vmapped else ""), []).append(job)
            else:
                self._answer(message, lambda job=job: self._run_alone(job))
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

    def _run_alone(self, job: TrainJob) -> Message:
        """A job with its own objective (FedProx, distillation...), with the threads the
        ClientApp would have."""
        with torch_threads(self.train_threads):
            return job.reply(job.run())


def _raise(err: Exception) -> Message:
    raise err
