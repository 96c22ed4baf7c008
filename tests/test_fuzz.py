"""Property-based: random malformed and hostile replies of every message type, among honest
clients, over several rounds. The server never crashes, its state stays finite, and a rejected
reply changes nothing: the honest clients end exactly where they would had the attacker only
sent errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_app.methods.fedgh import PROTO_VALUES, REP_DIM
from common import protocol
from common.config import resolve_config
from common.methods import METHODS, get_method
from server_app.run import build_strategy
from simulation.grid import InProcessGrid
from tests.test_hardening import SIZE, all_finite, honest_delta
from tests.test_strategy import SMALL, proof_of

KEYS = [
    protocol.CLIENT_KEY, protocol.NUM_PARAMS, protocol.GLOBAL_NUM_PARAMS, protocol.TENSOR_SIZES,
    protocol.ROLE, protocol.CLIENT_PROOF, protocol.NUM_EXAMPLES, "train-loss", "correct",
    "loss-sum", protocol.DELTA, protocol.DELTA_INDICES, protocol.DELTA_VALUES, protocol.INITIAL,
    "x",
]  # fmt: skip
SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=40),
)
CONFIG_VALUES = st.one_of(SCALARS, st.lists(st.integers(-5, 10**6), max_size=4))
METRIC_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=3),
)


@st.composite
def arrays(draw) -> Array:
    kind = draw(st.sampled_from(["values", "bytes", "lying shape"]))
    dtype = draw(st.sampled_from(["float32", "float64", "int32", "int64", "int8", "float16"]))
    if kind == "bytes":
        shape = (draw(st.integers(0, 10**13)),)
        return Array(dtype=draw(st.sampled_from([dtype, "object", "nonsense"])), shape=shape,
                     stype=draw(st.sampled_from(["numpy.ndarray", "torch", ""])),
                     data=draw(st.binary(max_size=64)))  # fmt: skip
    size = draw(st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1]))
    special = st.sampled_from([0.0, 1e37, -1e37, np.nan, np.inf, 3.0, -(2**31), 2**31 - 1])
    values = np.array(draw(st.lists(special, min_size=size, max_size=size)), np.float64)
    with np.errstate(all="ignore"):
        array = Array(
            values.astype(dtype) if "int" not in dtype else np.nan_to_num(values).astype(dtype)
        )
    if kind == "lying shape":
        return Array(dtype=array.dtype, shape=(SIZE,), stype=array.stype, data=array.data)
    return array


@st.composite
def records(draw) -> RecordDict:
    content = RecordDict()
    for name in draw(st.lists(st.sampled_from(["config", "metrics", "arrays"]), unique=True)):
        kind = draw(st.sampled_from(["config", "metrics", "arrays"]))  # maybe the wrong type
        keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=5))
        if kind == "config":
            content[name] = ConfigRecord({k: draw(CONFIG_VALUES) for k in keys})
        elif kind == "metrics":
            content[name] = MetricRecord({k: draw(METRIC_VALUES) for k in keys})
        else:
            content[name] = ArrayRecord({k: draw(arrays()) for k in keys})
    return content


REPLIES = st.one_of(
    records(),
    st.just("error"),
    st.builds(  # well-formed but hostile: a huge claim, a flipped or extreme delta
        lambda n, scale: ("hostile", n, scale),
        st.sampled_from([0, 1, 10**12, 2**62]),
        st.sampled_from([-100.0, 1e3, 1e9, 0.0]),
    ),
)


def honest_extras(method: str, where: str = "query") -> dict:
    """What a client of this method reports (or returns) besides the common fields: its
    declared fields, with values that fit the scripted clients' size K = SIZE."""
    values = {protocol.GLOBAL_NUM_PARAMS: SIZE, protocol.TENSOR_SIZES: [SIZE],
              protocol.INITIAL: np.ones(SIZE, np.float32),
              REP_DIM: SIZE - 1, PROTO_VALUES: np.zeros((1, SIZE - 1), np.float32)}  # fmt: skip
    client = get_method(method).client_class()
    fields = client.reports if where == "query" else client.returns
    return {f.name: values.get(f.name, f.example()) for f in fields}


def fuzzed_app(draws, attacked_types: set[str], method: str) -> ClientApp:
    """Clients c0-c3 are honest; c4 and c5 answer the attacked message types with drawn
    replies (and every other one honestly)."""
    app = ClientApp()

    def answer(msg, context, honest):
        i = int(context.node_config["partition-id"])
        if i < 4 or msg.metadata.message_type not in attacked_types:
            return Message(honest(i, msg), reply_to=msg)
        drawn = draws()
        if drawn == "error":
            return Message(Error(2, "fuzz"), reply_to=msg)
        if isinstance(drawn, tuple) and msg.metadata.message_type.startswith("evaluate"):
            _, n, _ = drawn  # a hostile count, every example right
            return Message(protocol.evaluate_reply(protocol.EvalResult(n, n, 0.0)), reply_to=msg)
        if isinstance(drawn, tuple):
            _, n, scale = drawn
            theta = protocol.read_theta(msg) if "arrays" in msg.content else np.zeros(SIZE)
            return Message(protocol.train_reply(scale * honest_delta(theta), n, 0.1), reply_to=msg)
        return Message(drawn, reply_to=msg)

    def identity(i, msg):  # what every method needs to hear
        extras = honest_extras(method)
        return protocol.identity_reply(f"c{i}", SIZE, proof=proof_of(f"c{i}"), extras=extras)

    def trained(i, msg):
        if "arrays" not in msg.content:  # the Local baseline
            return protocol.train_reply(None, 10 + i, 0.5)
        if get_method(method).client_class().returns:  # no delta: its own fields (FedGH)
            return protocol.train_reply(None, 10 + i, 0.5, extras=honest_extras(method, "train"))
        return protocol.train_reply(honest_delta(protocol.read_theta(msg)), 10 + i, 0.5)

    @app.query()
    def query(msg, context):
        return answer(msg, context, identity)

    @app.train()
    def train(msg, context):
        return answer(msg, context, trained)

    @app.train("global")
    def train_global(msg, context):
        return train(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return answer(
            msg, context, lambda i, m: protocol.evaluate_reply(protocol.EvalResult(10, 3 + i, 4.0))
        )

    @app.evaluate("global")
    def evaluate_global(msg, context):
        return evaluate(msg, context)

    return app


def run(app: ClientApp, method: str, schedule: str):
    cfg = resolve_config("default", {**SMALL, "rounds": 3, "method": method,
                                     "hypernetwork.schedule": schedule})  # fmt: skip
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(6)], {})
    strategy = build_strategy(cfg)
    strategy.start(grid)
    return strategy


def honest_state(strategy) -> dict[str, torch.Tensor]:
    state = strategy.state
    return {k: state.embedding(k).detach().clone() for k in ("c0", "c1", "c2", "c3")}


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    data=st.data(),
    method=st.sampled_from(["mh_pfedhn", "mh_pfedhngd", "fedavg", "local", "pfedlhn", "fedgh"]),
    schedule=st.sampled_from(["parallel_sequential", "one_by_one", "parallel_mean"]),
    attacked=st.sets(
        st.sampled_from(["train", "evaluate", "train.global", "evaluate.global"]), min_size=1
    ),  # fmt: skip
)
def test_random_hostile_replies_never_crash_and_rejected_ones_change_nothing(
    data, method, schedule, attacked
):
    if method in ("fedavg", "local", "fedgh"):
        attacked = attacked & {"train", "evaluate"} or {"train"}
    draws = lambda: data.draw(REPLIES)  # noqa: E731
    strategy = run(fuzzed_app(draws, attacked, method), method, schedule)
    assert [r["round"] for r in strategy.history] == [0, 1, 2, 3]
    for row in strategy.history:  # honest: 3 + i of 10 right; two attackers weigh <= 4x each
        accuracy = row.get("accuracy")
        assert accuracy is None or 0.0 <= accuracy <= (18 + 4 * 10 + 4 * 10) / (40 + 80)
    if method in ("fedavg", "local", "fedgh"):
        shared = {"fedavg": lambda s: s.weights, "fedgh": lambda s: s.vector()}.get(method)
        if shared is not None:
            assert np.isfinite(shared(strategy.state)).all()
            if all(r.get("clients_trained", 4) == 4 for r in strategy.history[1:]):
                reference = run(fuzzed_app(lambda: "error", attacked, method), method, schedule)
                assert np.array_equal(shared(strategy.state), shared(reference.state))
        return
    assert all_finite(strategy)
    honest_only = all(r.get("clients_trained", 4) == 4 for r in strategy.history[1:]) and all(
        r.get("global_clients_trained", 4) == 4 for r in strategy.history[1:]
    )
    if honest_only:  # every attacked reply was refused: as if c4 and c5 sent errors
        reference = run(fuzzed_app(lambda: "error", attacked, method), method, schedule)
        got, want = honest_state(strategy), honest_state(reference)
        assert all(torch.equal(got[k], want[k]) for k in want)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    data=st.data(),
    method=st.sampled_from(["mh_pfedhn", "mh_pfedhngd", "pfedhn", "fedavg", "pfedlhn", "fedgh"]),
)
def test_random_query_replies_never_crash_the_server(data, method):
    draws = lambda: data.draw(REPLIES)  # noqa: E731
    strategy = run(fuzzed_app(draws, {"query"}, method), method, "parallel_sequential")
    assert [r["round"] for r in strategy.history] == [0, 1, 2, 3]
    assert {"c0", "c1", "c2", "c3"} <= set(strategy.state.clients)


def declared_fields() -> list[tuple[str, str, protocol.Field]]:
    """(method, where, field) for every field a registered method's clients report or
    return: the hostile values of each must be refused with a reason naming it."""
    out = []
    for name, method in sorted(METHODS.items()):
        client = method.client_class()
        out += [(name, "query", f) for f in client.reports]
        out += [(name, "train", f) for f in client.returns]
    return out


@pytest.mark.parametrize(("method", "where", "field"), declared_fields(),
                         ids=lambda v: getattr(v, "name", v))  # fmt: skip
def test_every_declared_field_of_every_method_refuses_hostile_values(method, where, field):
    """A method's new message fields get the protocol's strict checks for free: each hostile
    value of each declared field is refused, the honest ones accepted."""
    for bad in field.hostile():
        extras = {**honest_extras(method, where), field.name: bad}
        scalars = {k: v for k, v in extras.items() if not isinstance(v, np.ndarray)}
        arrays = {k: Array(v) for k, v in extras.items() if isinstance(v, np.ndarray)}
        message = fake_reply(scalars, arrays)
        with pytest.raises(protocol.ReplyError, match=field.name):
            protocol.read_fields([field], message["config"], message.get("arrays"))
    honest = honest_extras(method, where)
    scalars = {k: v for k, v in honest.items() if not isinstance(v, np.ndarray)}
    arrays = {k: Array(v) for k, v in honest.items() if isinstance(v, np.ndarray)}
    message = fake_reply(scalars, arrays)
    assert field.name in protocol.read_fields([field], message["config"], message.get("arrays"))


def fake_reply(scalars: dict, arrays: dict) -> RecordDict:
    content = RecordDict({"config": ConfigRecord(scalars)})
    if arrays:
        content["arrays"] = ArrayRecord(arrays)
    return content


FIELD_KINDS = [
    protocol.Count("count"),
    protocol.Number("number", 0.0, 1.0),
    protocol.Sizes("sizes"),
    protocol.Floats("floats"),
    protocol.Indices("indices"),
]


@pytest.mark.parametrize("field", FIELD_KINDS, ids=lambda f: type(f).__name__)
def test_every_field_kind_refuses_hostile_values_and_the_wrong_record(field):
    """Each kind of field, those no registered method declares yet included (`Number`): its
    hostile values, and its honest value sent in the other record (an array where a scalar
    belongs, or the reverse), are refused as ReplyError, never another exception."""
    honest = field.example()
    in_arrays = isinstance(honest, np.ndarray)
    misplaced = (
        ({field.name: honest.tolist()}, {})
        if in_arrays
        else ({}, {field.name: Array(np.asarray(honest, np.float32).reshape(-1))})
    )
    placed = [({}, {field.name: Array(v)}) if isinstance(v, np.ndarray) else ({field.name: v}, {})
              for v in field.hostile()]  # fmt: skip
    for scalars, arrays in [misplaced, *placed]:
        message = fake_reply(scalars, arrays)
        with pytest.raises(protocol.ReplyError, match=field.name):
            protocol.read_fields([field], message["config"], message.get("arrays"))
    good = fake_reply(
        *(({}, {field.name: Array(honest)}) if in_arrays else ({field.name: honest}, {}))
    )
    assert field.name in protocol.read_fields([field], good["config"], good.get("arrays"))
