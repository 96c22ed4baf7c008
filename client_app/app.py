"""The ClientApp: report K, train the received vector, evaluate the received vector.

What a client reports and trains is its method's entry in common/methods.py: the Local
baseline (`trains="own"`) trains and evaluates the model it keeps itself; every other method
trains the vector it receives and answers with "sent minus trained". For MH-pFedHNG(D) the
client also trains and evaluates the public global model (`train.global`, `evaluate.global`)
and keeps the phase-1 vectors it may distill from.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.session import open_session
from client_app.train_job import TrainJob
from client_app.training import train_sgd
from common import protocol
from common.param_vector import model_to_vector, vector_size, vector_to_model
from deployment.warm_clientapp import STARTED_ENV as PROCESS_STARTED_ENV

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """K of the vector part (and what the chosen method needs besides: K_g, tensor sizes,
    initial vector), and the role when novel."""
    session = open_session(context)
    model = session.model()
    layout = session.layout(model)
    reports = session.method.reports
    global_size = sizes = initial = None
    if protocol.GLOBAL_NUM_PARAMS in reports:
        global_size = vector_size(session.model(global_model=True))
    if protocol.TENSOR_SIZES in reports:
        sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    if protocol.INITIAL in reports:
        initial = model_to_vector(model).numpy()
    reply = protocol.identity_reply(
        session.spec.key,
        vector_size(model, layout.shared),
        global_size,
        sizes,
        initial,
        role=session.spec.role,
        proof=session.proof(),
    )
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started, age = time.perf_counter(), process_age()
    session = open_session(context)
    opened = time.perf_counter()
    if session.method.trains == "own":  # the Local baseline: this client's own model
        model = session.local_model()
        evaluation = session.evaluate_first(msg, model)
        data = session.data
        generator = session.generator("train", protocol.read_round(msg))
        trained = time.perf_counter()
        loss = train_sgd(model, data.x_train, data.y_train, session.settings(), generator)
        train_s = time.perf_counter() - trained
        session.save_local_model(model)
        content = protocol.train_reply(None, len(data.y_train), loss, evaluation=evaluation)
    else:
        job = TrainJob.prepare(session, msg, global_model=False)
        trained = time.perf_counter()
        loss = job.run()
        train_s = time.perf_counter() - trained
        content = job.reply_content(loss)
    timings = {"process": age, "session": opened - started, "train": train_s,
               "handler": time.perf_counter() - started}  # fmt: skip
    return Message(protocol.with_timings(content, timings), reply_to=msg)


@app.train("global")
def train_global(msg: Message, context: Context) -> Message:
    job = TrainJob.prepare(open_session(context), msg, global_model=True)
    return job.reply(job.run())


def process_age() -> float | None:
    """Seconds since this process started (Linux): in deployment every message starts a new
    ClientApp process, and this is its start-up and imports. A process forked warm
    (deployment/warm_clientapp.py) counts from when the SuperExec started it."""
    if started := os.environ.get(PROCESS_STARTED_ENV):
        return max(time.time() - float(started), 0.0)
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))  # fmt: skip
        return max(time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")), 0.0)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _evaluate(msg: Message, context: Context, global_model: bool) -> Message:
    session = open_session(context)
    if session.method.trains == "own":  # the Local baseline: this client's own model
        model = session.local_model()
    else:
        model = session.model(global_model)
        layout = None if global_model else session.layout(model)
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)
        vector_to_model(model, theta, None if layout is None else layout.shared)
    return Message(protocol.evaluate_reply(session.evaluate(model)), reply_to=msg)


@app.evaluate()
def evaluate_theta(msg: Message, context: Context) -> Message:
    return _evaluate(msg, context, global_model=False)


@app.evaluate("global")
def evaluate_global(msg: Message, context: Context) -> Message:
    return _evaluate(msg, context, global_model=True)
