"""The wire protocol between the MH-pFedHN server and its clients (Flower Message content).

This is all a client implementation has to honour (see README "Plugging in your own model"):

- query         reply   config  {"client-key": str (at most 128 characters), "num-params": K
                                 [, "client-proof": str  (16-256 characters: a secret the
                                    client keeps; the first one registered binds the key)]
                                 [, "role": "novel"  (joins after training, paper 4.4)]
                                 [, "global-num-params": K_g  (MH-pFedHNG/GD)]
                                 [, "tensor-sizes": [int, ...]  (pFedHN, pFedLHN, pFedLA,
                                    PeFLL)]}
                        arrays  {"initial": float32[K]}  (FedAvg, FedAvgM, FedProx, pFedLA;
                                 FedAKT: its adapter's)
- train         in      arrays  {"theta": float32[K] [, "teacher": float32[K_g]]},
                        config  {"server-round": int [, "evaluate": true] [, "distill": bool,
                                 "distill-weight": a, "temperature": T, "teacher":
                                 "round_start" | "regenerated" | "phase1_trained"]}
                reply   arrays  {"delta": float32[K]}  (sent minus trained, "old - new")
                                or {"delta-indices": int32[n], "delta-values": float32[n]}
                                (top-p upload: the n largest |delta| entries, indices ascending)
                        metrics {"num-examples": int, "train-loss": float
                                 [, "eval-num-examples", "eval-correct", "eval-loss-sum":
                                 theta on the test split before training, when "evaluate";
                                 "eval-val-...": on the validation split, if it has one]}
- evaluate      in      arrays  {"theta": float32[K]}, config {"server-round": int}
                reply   metrics {"num-examples": int, "correct": int, "loss-sum": float
                                 [, "val-num-examples", "val-correct", "val-loss-sum": the
                                    same on the client's validation split, if it has one]}
- train.global, evaluate.global: as train and evaluate, for the public global model (K_g)
- train, evaluate without "arrays" (Local baseline): the client trains / evaluates the model it
  keeps itself; the train reply then carries metrics only

The server never learns an architecture, layer names or data: only K, deltas and counts.
Parsing is strict so that a malformed reply is refused before it can touch server state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"
TRAIN_GLOBAL = "train.global"
EVALUATE_GLOBAL = "evaluate.global"

THETA = "theta"
TEACHER = "teacher"
DELTA = "delta"
DELTA_INDICES = "delta-indices"
DELTA_VALUES = "delta-values"
ROLE = "role"
ROLES = ("training", "novel")
CLIENT_KEY = "client-key"
NUM_PARAMS = "num-params"
GLOBAL_NUM_PARAMS = "global-num-params"
TENSOR_SIZES = "tensor-sizes"
INITIAL = "initial"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
EVALUATE_FIRST = "evaluate"  # train config: evaluate the received vector before training
EVAL_PREFIX = "eval-"  # ...and report it with these metrics (eval-num-examples, ...)
VAL_PREFIX = "val-"  # the same on the validation split (val-num-examples, ...), if it has one
CLIENT_PROOF = (
    "client-proof"  # a secret the client keeps; binds its key (server_app/client_directory.py)
)

IDENTITY_FIELDS = (CLIENT_KEY, NUM_PARAMS, CLIENT_PROOF, ROLE)  # what every query reply may hold
MAX_KEY_LENGTH = 128
MIN_PROOF_LENGTH, MAX_PROOF_LENGTH = 16, 256
MAX_VECTOR = 2**31 - 1  # no vector of more entries is ever accepted
MAX_TENSORS = 1024  # parameter tensors a model may report (pFedHN makes a head for each, and
# a step's cost grows with them: 10,000 made a step 265x slower; ResNet-18 has 62)


class ReplyError(ValueError):
    """A client reply that cannot be used; the round goes on without it."""


@dataclass(frozen=True)
class Identity:
    client_key: str
    num_params: object  # validated by the server (it may be anything a client sends)
    role: str = "training"
    proof: str | None = field(default=None, repr=False)  # never printed
    extras: dict[str, Any] = field(default_factory=dict, repr=False)  # the method's fields


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    correct: int
    loss_sum: float
    validation: EvalResult | None = None  # the same model on the client's validation split


@dataclass(frozen=True)
class TrainResult:
    delta: np.ndarray  # dense, float32[K] (rebuilt from a top-p upload)
    num_examples: int
    train_loss: float
    bytes_up: int = 0  # payload bytes of the arrays as they travelled (none for Local)
    evaluation: EvalResult | None = None  # of the received vector, before training
    extras: dict[str, Any] = field(default_factory=dict, repr=False)  # the method's fields


# ------------------------------------------------------------------ server -> client
def _array(vector: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(vector, np.float32))


def instruction(
    theta: np.ndarray | None,
    server_round: int,
    config: Mapping[str, bool | int | float | str] | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
) -> RecordDict:
    """Content of a train/evaluate instruction (a query carries no vector); `extras`: a
    method's own float32 arrays."""
    content = RecordDict({"config": ConfigRecord({SERVER_ROUND: server_round, **(config or {})})})
    arrays = {}
    if theta is not None:
        arrays[THETA] = _array(theta)
    arrays.update({name: _array(value) for name, value in (extras or {}).items()})
    if arrays:
        content["arrays"] = ArrayRecord(arrays)
    return content


def read_theta(message: Message) -> np.ndarray:
    return message.content["arrays"][THETA].numpy()


def read_round(message: Message) -> int:
    return int(message.content["config"][SERVER_ROUND])


def read_config(message: Message) -> dict:
    return dict(message.content["config"])


def read_teacher(message: Message) -> np.ndarray:
    return message.content["arrays"][TEACHER].numpy()


# ------------------------------------------------------------------ client -> server
def identity_reply(
    client_key: str,
    num_params: int,
    role: str = "training",
    proof: str | None = None,
    extras: Mapping[str, Any] | None = None,
) -> RecordDict:
    """A query reply: key, K, and the fields the client's method reports (`extras`: scalars
    and int lists go into the config record, numpy arrays into the arrays record)."""
    identity: dict = {CLIENT_KEY: client_key, NUM_PARAMS: num_params}
    if proof is not None:
        identity[CLIENT_PROOF] = proof
    if role != "training":
        identity[ROLE] = role
    return _content("config", identity, {}, extras)


def top_p_entries(delta: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices ascending, values) of the ceil(p K) entries largest in absolute value.

    Ties at the threshold are broken by the lower index, so the choice is deterministic.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    count = min(delta.size, max(1, int(np.ceil(top_p * delta.size))))
    order = np.argsort(-np.abs(delta), kind="stable")[:count]
    indices = np.sort(order).astype(np.int32)
    return indices, np.asarray(delta[indices], np.float32)


def train_reply(
    delta: np.ndarray | None,
    num_examples: int,
    train_loss: float,
    top_p: float | None = None,
    evaluation: EvalResult | None = None,
    extras: Mapping[str, Any] | None = None,
) -> RecordDict:
    """delta None: the Local baseline, which sends no parameters. top_p: send only the top-p
    share of the delta by absolute value, as indices and values (paper C.7). evaluation: the
    received vector on the client's test split, asked for with config `evaluate`. extras:
    the fields the client's method returns (numbers into the metrics, arrays as arrays)."""
    metrics = {NUM_EXAMPLES: num_examples, "train-loss": train_loss}
    if evaluation is not None:
        metrics.update(_evaluation_metrics(evaluation, EVAL_PREFIX))
    arrays = {}
    if delta is not None and top_p is None:
        arrays[DELTA] = _array(delta)
    elif delta is not None:
        indices, values = top_p_entries(np.asarray(delta, np.float32), top_p)
        arrays.update({DELTA_INDICES: Array(indices), DELTA_VALUES: _array(values)})
    return _content("metrics", metrics, arrays, extras)


def _content(
    record: str, scalars: dict, arrays: dict, extras: Mapping[str, Any] | None
) -> RecordDict:
    """A reply of these scalars (in a `record` ConfigRecord or MetricRecord) and arrays, with
    a method's fields added: numpy arrays (in their own dtype, as declared) among the arrays,
    the rest among the scalars."""
    for name, value in (extras or {}).items():
        if isinstance(value, np.ndarray):
            arrays[name] = Array(np.ascontiguousarray(value))
        else:
            scalars[name] = value
    kind = ConfigRecord if record == "config" else MetricRecord
    content = RecordDict({record: kind(scalars)})
    if arrays:
        content["arrays"] = ArrayRecord(arrays)
    return content


def _evaluation_metrics(evaluation: EvalResult, prefix: str = "") -> dict:
    metrics = {
        f"{prefix}{NUM_EXAMPLES}": evaluation.num_examples,
        f"{prefix}correct": evaluation.correct,
        f"{prefix}loss-sum": evaluation.loss_sum,
    }
    if evaluation.validation is not None:
        metrics.update(_evaluation_metrics(evaluation.validation, f"{prefix}{VAL_PREFIX}"))
    return metrics


def evaluate_reply(evaluation: EvalResult) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(_evaluation_metrics(evaluation))})


TIMINGS = ("process", "session", "train", "handler")  # reply metrics time-<name>, seconds


def with_timings(content: RecordDict, timings: Mapping[str, float | None]) -> RecordDict:
    """A reply that also tells where the client's time went (a deployment breakdown):
    process: since its process started; session: config and data; train; handler: all."""
    metrics = content["metrics"]
    for name, seconds in timings.items():
        if seconds is not None:
            metrics[f"time-{name}"] = float(seconds)
    return content


def read_timings(message: Message) -> dict[str, float]:
    """A reply's time-* metrics; informational, so anything odd is left out, never refused."""
    if message.has_error() or "metrics" not in message.content:
        return {}
    metrics = message.content["metrics"]
    if not isinstance(metrics, MetricRecord):
        return {}
    out = {}
    for name in TIMINGS:
        value = metrics.get(f"time-{name}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e6:
            out[name] = float(value)
    return out


# --------------------------------------------------------------- strict parsing
# A reply is client-chosen bytes: every parser below raises ReplyError, and nothing else, for
# anything it cannot use, and checks sizes before it decodes (tests/test_hardening.py).


# How Flower's runtimes word an exception a ClientApp raised: "<class 'pkg.Name'>:<'text'>".
_FLOWER_EXCEPTION = re.compile(r"<class '(?:[\w.]*\.)?([\w()]+)'>:<'(.*)'>", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# a traceback's exception line: "ValueError: ...", or a bare "AssertionError"
_RAISED = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?:: (.*))?$", re.MULTILINE
)


def error_text(message: Message) -> str:
    """An error reply, said plainly: `client error 2: NodeConfigError: unknown ...`. Flower's
    simulation wraps the client's exception in Ray's traceback (colours included): the first
    exception raised in it is the cause, which is what is said."""
    reason = _ANSI.sub("", str(message.error.reason))
    if match := _FLOWER_EXCEPTION.fullmatch(reason.strip()):
        name, said = match[1], match[2]
        if '\n  File "' in said:
            raised = (m for m in _RAISED.finditer(said) if not m[1].endswith("ClientAppException"))
            if cause := next(raised, None):
                name, said = cause[1].rsplit(".", 1)[-1], cause[2] or "(no message)"
        reason = f"{name}: {said}"
    return f"client error {message.error.code}: {reason}"[:500]


def _record(message: Message, name: str, kind: type):
    if message.has_error():
        raise ReplyError(error_text(message))
    if not message.has_content() or name not in message.content:
        raise ReplyError(f"reply has no {name!r} record")
    record = message.content[name]
    if not isinstance(record, kind):
        raise ReplyError(f"reply record {name!r} is a {type(record).__name__}, not {kind.__name__}")
    return record


def _field(record, name: str, types: tuple[type, ...]):
    if name not in record:
        raise ReplyError(f"reply lacks {name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ReplyError(f"{name!r} has type {type(value).__name__}")
    return value


def _optional_arrays(message: Message) -> ArrayRecord | None:
    if "arrays" not in message.content:
        return None
    return _record(message, "arrays", ArrayRecord)


def _decode(
    arrays: ArrayRecord,
    name: str,
    dtypes: tuple[type, ...],
    max_size: int,
    shape=None,
    any_shape: bool = False,
) -> np.ndarray:
    """One array, strictly: its declared serialisation, dtype and size are checked before
    it is decoded (so a claim of 10^12 entries costs nothing), the decoded array must match
    what it declared, and a decoding failure is a ReplyError."""
    array = arrays[name]
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise ReplyError(f"{name!r} is not a numpy-serialised array")
    try:
        dtype = np.dtype(array.dtype)
        declared = tuple(int(n) for n in array.shape)
    except (TypeError, ValueError) as err:
        raise ReplyError(f"{name!r} declares an unusable dtype or shape ({err})") from None
    if dtype not in [np.dtype(d) for d in dtypes]:
        raise ReplyError(f"{name!r} has dtype {dtype}, expected {'/'.join(map(str, dtypes))}")
    if any_shape:
        if not 1 <= len(declared) <= 4 or min(declared) < 0 or math.prod(declared) > max_size:
            raise ReplyError(f"{name!r} has shape {declared}, expected at most {max_size} "
                             "entries in 1-4 dimensions")  # fmt: skip
    elif len(declared) != 1 or not 0 <= declared[0] <= max_size:
        raise ReplyError(f"{name!r} has shape {declared}, expected at most ({max_size},)")
    if shape is not None and declared != shape:
        raise ReplyError(f"{name!r} has shape {declared}, expected {shape}")
    try:
        values = array.numpy()
    except Exception as err:  # noqa: BLE001 - any decoding failure is the client's fault
        raise ReplyError(f"{name!r} cannot be decoded ({type(err).__name__})") from None
    if values.dtype != dtype or values.shape != declared:
        raise ReplyError(f"{name!r} holds {values.dtype}{values.shape}, not the declared "
                         f"{dtype}{declared}")  # fmt: skip
    return values


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ReplyError(f"{what} holds {int((~np.isfinite(values)).sum())} NaN/Inf values")
    return values


def check_client_key(key: object) -> str:
    """A client key: a non-empty printable string of at most MAX_KEY_LENGTH characters."""
    if not isinstance(key, str) or not key:
        raise ReplyError(f"client key must be a non-empty string, got {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise ReplyError(f"client key of {len(key)} characters (at most {MAX_KEY_LENGTH})")
    if not key.isprintable():
        raise ReplyError("client key holds control characters")
    return key


def parse_identity(message: Message, fields: Sequence[Field] = ()) -> Identity:
    """A query reply, strictly; `fields` are what the client's method reports besides its key
    and K (each validated by its declaration)."""
    config = _record(message, "config", ConfigRecord)
    key = check_client_key(_field(config, CLIENT_KEY, (str,)))
    if NUM_PARAMS not in config:
        raise ReplyError(f"reply lacks {NUM_PARAMS!r}")
    role = config.get(ROLE, "training")
    if role not in ROLES:
        raise ReplyError(f"unknown role {str(role)[:40]!r}; expected one of {ROLES}")
    proof = config.get(CLIENT_PROOF)
    if proof is not None and (
        not isinstance(proof, str) or not MIN_PROOF_LENGTH <= len(proof) <= MAX_PROOF_LENGTH
    ):
        raise ReplyError(
            f"{CLIENT_PROOF!r} must be a string of {MIN_PROOF_LENGTH}-{MAX_PROOF_LENGTH} characters"
        )
    arrays = _optional_arrays(message)
    declared = {f.name for f in fields}
    unexpected = sorted((set(config) - set(IDENTITY_FIELDS)) | set(arrays or ()))
    unexpected = [name for name in unexpected if name not in declared]
    if unexpected:
        shown = ", ".join(repr(str(n)[:40]) for n in unexpected[:5])
        raise ReplyError(f"reply carries {shown}, which this method's clients do not report")
    extras = read_fields(fields, config, arrays)
    return Identity(key, config[NUM_PARAMS], role, proof, extras)


def _count(metrics, name: str) -> int:
    value = _field(metrics, name, (int, float))
    if not np.isfinite(value) or value < 0 or float(value) != int(value):
        raise ReplyError(f"{name!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _loss(metrics) -> float:
    """The reported train loss: present and finite (it is averaged into the round's)."""
    loss = float(_field(metrics, "train-loss", (int, float)))
    if not np.isfinite(loss):
        raise ReplyError(f"train-loss is {loss} (a finite number is required)")
    return loss


def printable(text: object, limit: int = 500) -> str:
    """Client-controlled text made safe to log and show: control characters (newlines,
    terminal escapes) written as escapes, at most `limit` characters."""
    text = str(text)[:limit]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)  # fmt: skip


def _sparse_delta(arrays: ArrayRecord, expected_params: int) -> tuple[np.ndarray, int]:
    """The dense delta from a top-p upload (zero off the sent indices), and the bytes sent."""
    if DELTA_INDICES not in arrays or DELTA_VALUES not in arrays:
        raise ReplyError(f"reply lacks the {DELTA!r} array (or {DELTA_INDICES!r} and "
                         f"{DELTA_VALUES!r})")  # fmt: skip
    indices = _decode(arrays, DELTA_INDICES, (np.int32, np.int64), expected_params)
    values = _decode(arrays, DELTA_VALUES, (np.float32,), expected_params, indices.shape)
    _finite(values, "delta-values")
    if indices.size and (indices.min() < 0 or indices.max() >= expected_params):
        raise ReplyError(f"delta-indices outside 0..{expected_params - 1}")
    if indices.size > 1 and not (np.diff(indices) > 0).all():
        raise ReplyError("delta-indices must be strictly increasing (no repeats)")
    delta = np.zeros(expected_params, np.float32)
    delta[indices] = values
    return delta, indices.nbytes + values.nbytes


def parse_train_reply(
    message: Message,
    expected_params: int,
    max_abs: float = float("inf"),
    fields: Sequence[Field] = (),
) -> TrainResult:
    """A dense or top-p delta, checked before it can reach the server state; an entry above
    `max_abs` in absolute value refuses it. `fields`: what the method returns besides."""
    arrays = _record(message, "arrays", ArrayRecord)
    metrics = _record(message, "metrics", MetricRecord)
    num_examples = _count(metrics, NUM_EXAMPLES)
    if num_examples == 0:
        raise ReplyError("num-examples is 0")
    loss = _loss(metrics)
    if DELTA in arrays:
        shape = (expected_params,)
        delta = _finite(_decode(arrays, DELTA, (np.float32,), expected_params, shape), "delta")
        bytes_up = delta.nbytes
    else:
        delta, bytes_up = _sparse_delta(arrays, expected_params)
    largest = float(np.abs(delta).max()) if delta.size else 0.0
    if largest > max_abs:
        raise ReplyError(f"delta has an entry of {largest:.3g} (at most {max_abs:g} accepted: "
                         "server.max_delta_abs)")  # fmt: skip
    extras = read_fields(fields, metrics, arrays)
    return TrainResult(delta, num_examples, loss, bytes_up + _array_bytes(extras, arrays),
                       _fused_evaluation(metrics), extras)  # fmt: skip


def _array_bytes(extras: dict[str, Any], arrays: ArrayRecord | None) -> int:
    """What a reply's own arrays (a method's fields: FedGH's prototypes...) weighed as they
    travelled (their declared dtype, which decoding may widen), once read and checked."""
    return sum(np.dtype(arrays[name].dtype).itemsize * math.prod(arrays[name].shape)
               for name, v in extras.items() if isinstance(v, np.ndarray))  # fmt: skip


def _fused_evaluation(metrics) -> EvalResult | None:
    """The evaluation a train reply carries (config `evaluate`), if any."""
    if f"{EVAL_PREFIX}{NUM_EXAMPLES}" not in metrics:
        return None
    return _evaluation(metrics, EVAL_PREFIX)


def fields_reply(extras: Mapping[str, Any]) -> RecordDict:
    """A reply of nothing but a method's fields (e.g. to one of its own message types)."""
    return _content("metrics", {}, {}, extras)


def parse_fields_reply(message: Message, fields: Sequence[Field]) -> dict[str, Any]:
    """A `fields_reply`, strictly: its declared fields, no array it does not declare."""
    metrics = _record(message, "metrics", MetricRecord)
    arrays = _optional_arrays(message)
    unexpected = sorted(set(arrays or ()) - {f.name for f in fields})
    if unexpected:
        raise ReplyError(f"reply carries {', '.join(repr(str(n)[:40]) for n in unexpected[:5])}")
    return read_fields(fields, metrics, arrays)


def parse_fused_evaluation(message: Message) -> EvalResult | None:
    """The evaluation a train reply carries (config `evaluate`), if any, strictly."""
    return _fused_evaluation(_record(message, "metrics", MetricRecord))


def parse_local_train_reply(message: Message, fields: Sequence[Field] = ()) -> TrainResult:
    """A reply that carries no parameters (the Local baseline): metrics only, and the arrays
    its method's `fields` declare, if any."""
    metrics = _record(message, "metrics", MetricRecord)
    arrays = _optional_arrays(message)
    allowed = {f.name for f in fields}
    if arrays is not None and set(arrays) - allowed:
        raise ReplyError("this method's clients send no parameters")
    num_examples = _count(metrics, NUM_EXAMPLES)
    extras = read_fields(fields, metrics, arrays)
    sent = _array_bytes(extras, arrays)
    return TrainResult(np.empty(0, np.float32), num_examples, _loss(metrics), sent,
                       _fused_evaluation(metrics), extras)  # fmt: skip


def _evaluation(metrics, prefix: str = "", validation: bool = True) -> EvalResult:
    n = _count(metrics, f"{prefix}{NUM_EXAMPLES}")
    correct = _count(metrics, f"{prefix}correct")
    loss_sum = float(_field(metrics, f"{prefix}loss-sum", (int, float)))
    if correct > n or not np.isfinite(loss_sum) or loss_sum < 0:
        raise ReplyError(f"inconsistent evaluation: correct={correct}, n={n}, loss-sum={loss_sum}")
    held_out = None
    if validation and f"{prefix}{VAL_PREFIX}{NUM_EXAMPLES}" in metrics:
        held_out = _evaluation(metrics, f"{prefix}{VAL_PREFIX}", validation=False)
    return EvalResult(num_examples=n, correct=correct, loss_sum=loss_sum, validation=held_out)


def parse_evaluate_reply(message: Message) -> EvalResult:
    return _evaluation(_record(message, "metrics", MetricRecord))


# ------------------------------------------------------------ method fields
# What a method's clients report (query reply) or return (train reply) besides the common
# fields: each method declares its fields with their types and bounds (on its client class,
# client_app/method.py), and these declarations validate them strictly, so that hardening
# and fuzzing cover every method without parsing code of its own.


@dataclass(frozen=True)
class Field:
    """One named value in a reply; `required` ones must be present."""

    name: str
    required: bool = True

    def read(self, scalars: Mapping[str, Any], arrays: ArrayRecord | None) -> Any:
        raise NotImplementedError

    def hostile(self) -> list[Any]:
        """Values a hostile client might send that must be refused (tests/test_fuzz.py)."""
        raise NotImplementedError

    def example(self) -> Any:
        """A value an honest client might send (tests/test_fuzz.py)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Count(Field):
    """A positive integer up to `maximum` (a parameter count, a class count)."""

    minimum: int = 1
    maximum: int = MAX_VECTOR

    def read(self, scalars: Mapping[str, Any], arrays: ArrayRecord | None) -> int:
        value = _field(scalars, self.name, (int,))
        if not self.minimum <= value <= self.maximum:
            raise ReplyError(f"{self.name!r} must lie in [{self.minimum}, {self.maximum}], "
                             f"got {value}")  # fmt: skip
        return int(value)

    def hostile(self) -> list[Any]:
        return [self.minimum - 1, self.maximum + 1, 1.5, "7", True, float("nan")]

    def example(self) -> int:
        return self.minimum


@dataclass(frozen=True)
class Number(Field):
    """A finite float within [minimum, maximum]."""

    minimum: float = -float("inf")
    maximum: float = float("inf")

    def read(self, scalars: Mapping[str, Any], arrays: ArrayRecord | None) -> float:
        value = float(_field(scalars, self.name, (int, float)))
        if not np.isfinite(value) or not self.minimum <= value <= self.maximum:
            raise ReplyError(f"{self.name!r} must be finite and in [{self.minimum}, "
                             f"{self.maximum}], got {value!r}")  # fmt: skip
        return value

    def hostile(self) -> list[Any]:
        return [float("nan"), float("inf"), "1.0", True]

    def example(self) -> float:
        return min(max(0.0, self.minimum), self.maximum)


@dataclass(frozen=True)
class Sizes(Field):
    """A list of at most `max_length` integers, each in [1, MAX_VECTOR] (tensor sizes)."""

    max_length: int = MAX_TENSORS

    def read(self, scalars: Mapping[str, Any], arrays: ArrayRecord | None) -> list[int]:
        value = scalars.get(self.name)  # None (refused below) if it came as an array
        if (
            not isinstance(value, list)
            or not value
            or len(value) > self.max_length
            or not all(type(n) is int and 0 < n <= MAX_VECTOR for n in value)
        ):
            raise ReplyError(f"{self.name!r} must be a list of 1 to {self.max_length} positive "
                             "integers")  # fmt: skip
        return list(value)

    def hostile(self) -> list[Any]:
        return [[], [0], [-3], [1.5], [1] * (self.max_length + 1), "3,4", 7]

    def example(self) -> list[int]:
        return [1]


@dataclass(frozen=True)
class Floats(Field):
    """A float32 array of at most `max_size` finite entries, each at most `max_abs` in
    absolute value; `shape`, if given, is checked exactly (a -1 entry: any length there)."""

    max_size: int = MAX_VECTOR
    max_abs: float = float("inf")
    shape: tuple[int, ...] | None = None

    def read(self, scalars: Mapping[str, Any], arrays: ArrayRecord | None) -> np.ndarray:
        if arrays is None or self.name not in arrays:
            raise ReplyError(f"reply lacks the {self.name!r} array")
        values = _decode(arrays, self.name, (np.float32,), self.max_size, any_shape=True)
        _finite(values, self.name)
        if self.shape is not None and not _shape_fits(values.shape, self.shape):
            raise ReplyError(f"{self.name!r} has shape {values.shape}, expected {self.shape}")
        largest = float(np.abs(values).max()) if values.size else 0.0
        if largest > self.max_abs:
            raise ReplyError(f"{self.name!r} has an entry of {largest:.3g} (at most "
                             f"{self.max_abs:g})")  # fmt: skip
        return values

    def hostile(self) -> list[Any]:
        bad = [np.full(3, np.nan, np.float32), np.zeros(3, np.float64)]
        if np.isfinite(self.max_abs):
            bad.append(np.full(3, 2 * self.max_abs, np.float32))
        return bad

    def example(self) -> np.ndarray:
        shape = (3,) if self.shape is None else tuple(1 if n == -1 else n for n in self.shape)
        return np.zeros(shape, np.float32)


@dataclass(frozen=True)
class Indices(Field):
    """A 1-D int32/int64 array of at most `max_size` strictly increasing entries in
    [0, max_value) (class labels, positions)."""

    max_size: int = MAX_TENSORS
    max_value: int = MAX_VECTOR

    def read(self, scalars: Mapping[str, Any], arrays: ArrayRecord | None) -> np.ndarray:
        if arrays is None or self.name not in arrays:
            raise ReplyError(f"reply lacks the {self.name!r} array")
        values = _decode(arrays, self.name, (np.int32, np.int64), self.max_size)
        if values.size and (values.min() < 0 or values.max() >= self.max_value):
            raise ReplyError(f"{self.name!r} has entries outside 0..{self.max_value - 1}")
        if values.size > 1 and not (np.diff(values) > 0).all():
            raise ReplyError(f"{self.name!r} must be strictly increasing")
        return values.astype(np.int64)

    def hostile(self) -> list[Any]:
        return [np.array([3, 1], np.int32), np.array([-1], np.int32),
                np.array([self.max_value], np.int64), np.zeros(2, np.float32)]  # fmt: skip

    def example(self) -> np.ndarray:
        return np.array([0], np.int32)


def _shape_fits(shape: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """-1 in `wanted` takes any length."""
    if len(shape) != len(wanted):
        return False
    return all(w in (-1, n) for w, n in zip(wanted, shape, strict=True))


def read_fields(
    fields: Sequence[Field], scalars: Mapping[str, Any], arrays: ArrayRecord | None
) -> dict[str, Any]:
    """The declared fields of a reply; a missing required one, or any malformed one, is a
    ReplyError (optional ones that are absent are left out)."""
    out = {}
    for spec in fields:
        present = spec.name in scalars or (arrays is not None and spec.name in arrays)
        if not present:
            if spec.required:
                raise ReplyError(f"reply lacks {spec.name!r}")
            continue
        out[spec.name] = spec.read(scalars, arrays)
    return out
