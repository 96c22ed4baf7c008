"""The ClientApp: every message goes to the client side of the run's method.

Which method, and so which client class (`client_app/method.py`, or its own in
`client_app/methods/`), comes from the run's configuration; this module knows no method by
name. Flower routes a message by its type, so a handler is registered for query, train and
evaluate and for every extra type a registered method answers (e.g. `train.global`).
"""

from __future__ import annotations

import time
from functools import cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.method import ClientMethod
from client_app.process import process_age
from client_app.session import open_session
from common import protocol
from common.methods import METHODS, get_method

app = ClientApp()


@cache
def client_method(name: str) -> ClientMethod:
    """The client side of a method (one instance per process: it holds no state)."""
    return get_method(name).client_class()()


def handle(msg: Message, context: Context) -> Message:
    started, age = time.perf_counter(), process_age()
    session = open_session(context)
    opened = time.perf_counter()
    content = client_method(session.cfg.method).handle(session, msg)
    if msg.metadata.message_type == protocol.TRAIN:  # where a deployed round's time goes
        handled = time.perf_counter()
        timings = {"process": age, "session": opened - started, "train": handled - opened,
                   "handler": handled - started}  # fmt: skip
        content = protocol.with_timings(content, timings)
    return Message(content, reply_to=msg)


app.query()(handle)
app.train()(handle)
app.evaluate()(handle)
for _type in sorted({t for m in METHODS.values() for t in m.client_class().actions}):
    _category, _, _action = _type.partition(".")
    getattr(app, _category)(_action)(handle)
