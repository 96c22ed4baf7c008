"""Client-side options: local layers (paper C.9), frozen layers (C.10), top-p uploads (C.7)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from client_app.app import app as client_app
from client_app.session import LOCAL_LAYERS
from client_app.spec import client_spec
from common import protocol
from common.config import resolve_config
from common.models import build_model
from common.param_vector import (
    matching_parameter_names,
    parse_layer_patterns,
    select_parameter_names,
    vector_size,
)
from server_app.run import build_strategy
from simulation.grid import InProcessGrid
from tests.test_client_app import context_for, run_config, send

LENET_HEAD = "classifier.5.*"  # LeNet's classification layer


def lenet():
    return build_model("lenet", num_classes=4, in_channels=1)


def slice_of(model, pattern: str) -> slice:
    """Where the parameters matching `pattern` lie in the full vector."""
    start = 0
    bounds = []
    for name, p in model.named_parameters():
        if name in matching_parameter_names(model, [pattern], "pattern"):
            bounds.append((start, start + p.numel()))
        start += p.numel()
    return slice(bounds[0][0], bounds[-1][1])


def lenet_config(tiny_npz, tmp_path, **extra):
    return run_config(tiny_npz, tmp_path, **{"clients.models": "lenet", **extra})


def test_layer_patterns_parse_and_a_selection_matching_nothing_is_refused():
    assert parse_layer_patterns("none") == [] and parse_layer_patterns("") == []
    assert parse_layer_patterns("a.*|b.*, c") == ["a.*", "b.*", "c"]
    model = lenet()
    # one mode may name layers of several architectures: what exists here is used
    assert matching_parameter_names(model, [LENET_HEAD, "fc.*"], "x") == [
        "classifier.5.weight",
        "classifier.5.bias",
    ]
    with pytest.raises(ValueError, match="match no parameter"):
        matching_parameter_names(model, ["clasifier.*"], "local-layers")


def test_modes_are_spread_over_every_architecture():
    cfg = resolve_config(
        "default", {"clients.models": "lenet,mlp", "clients.local_layers": f"none,{LENET_HEAD}"}
    )
    specs = [client_spec({"partition-id": i, "num-partitions": 4}, cfg) for i in range(4)]
    assert [(s.model_name, s.local_layers) for s in specs] == [
        ("lenet", ()),
        ("mlp", ()),
        ("lenet", (LENET_HEAD,)),
        ("mlp", (LENET_HEAD,)),
    ]


def test_local_layers_are_not_in_k_and_persist_across_rounds(tiny_npz, tmp_path):
    node = {"partition-id": 0, "num-partitions": 2, "local-layers": LENET_HEAD}
    context = context_for(lenet_config(tiny_npz, tmp_path), node)
    model = lenet()
    shared = select_parameter_names(model, exclude=[LENET_HEAD])
    k = vector_size(model, shared)
    assert (
        protocol.parse_identity(send(protocol.QUERY, context)).num_params == k < vector_size(model)
    )
    theta = np.zeros(k, np.float32)
    theta[:] = np.random.default_rng(0).normal(0, 0.05, k)
    initial = model.classifier[5].weight.detach().numpy().copy()
    reply = send(protocol.TRAIN, context, theta)
    assert protocol.parse_train_reply(reply, k).delta.shape == (k,)
    after_one = context.state[LOCAL_LAYERS]["classifier.5.weight"].numpy().copy()
    assert not np.array_equal(after_one, initial)  # they trained
    send(protocol.TRAIN, context, theta, server_round=2)
    after_two = context.state[LOCAL_LAYERS]["classifier.5.weight"].numpy().copy()
    # round 2 started from round 1's layers: a client that forgot them ends elsewhere
    fresh = context_for(lenet_config(tiny_npz, tmp_path), node)
    send(protocol.TRAIN, fresh, theta, server_round=2)
    forgot = fresh.state[LOCAL_LAYERS]["classifier.5.weight"].numpy()
    assert not np.array_equal(after_two, after_one)
    assert not np.array_equal(after_two, forgot)


def test_local_layers_survive_a_restart_with_a_state_directory(tiny_npz, tmp_path):
    node = {
        "partition-id": 0,
        "num-partitions": 2,
        "local-layers": LENET_HEAD,
        "state-dir": str(tmp_path / "state"),
    }
    k = vector_size(lenet(), select_parameter_names(lenet(), exclude=[LENET_HEAD]))
    theta = np.random.default_rng(0).normal(0, 0.05, k).astype(np.float32)
    context = context_for(lenet_config(tiny_npz, tmp_path), node)
    send(protocol.TRAIN, context, theta)
    kept = {k: v.numpy() for k, v in context.state[LOCAL_LAYERS].items()}
    assert (tmp_path / "state" / "partition-0" / f"{LOCAL_LAYERS}.npz").is_file()
    restarted = context_for(lenet_config(tiny_npz, tmp_path), node)  # empty context.state
    before = protocol.parse_evaluate_reply(send(protocol.EVALUATE, context, theta))
    after = protocol.parse_evaluate_reply(send(protocol.EVALUATE, restarted, theta))
    assert after == before
    for name, value in kept.items():
        assert np.array_equal(restarted.state[LOCAL_LAYERS][name].numpy(), value)


def run_two_rounds(tiny_npz, tmp_path, **extra):
    """A 2-client, 2-round in-process run; returns the strategy and every array sent
    (name, size), both ways."""
    run_cfg = lenet_config(
        tiny_npz,
        tmp_path,
        rounds=2,
        **{
            "server.min_nodes": 2,
            "server.wait_for_nodes_s": 0,
            "server.checkpoint_every": 0,
            "server.output_root": str(tmp_path / "out"),
            "hypernetwork.hidden_dim": 8,
            **extra,
        },
    )
    seen: list[tuple[str, int]] = []

    def recording_app(message, context):
        reply = client_app(message, context)
        for m in (message, reply):
            for record in m.content.array_records.values() if m.has_content() else []:
                seen.extend((name, int(np.prod(a.shape))) for name, a in record.items())
        return reply

    cfg = resolve_config("default", run_cfg)
    grid = InProcessGrid.simulation(recording_app, 2, run_cfg)
    strategy = build_strategy(cfg)
    strategy.start(grid)
    return strategy, seen


def test_local_layers_never_leave_the_client(tiny_npz, tmp_path):
    """Every array of every message, both ways, over a 2-round run: none holds local layers."""
    local = {"clients.local_layers": f"{LENET_HEAD}|features.0.*"}
    strategy, seen = run_two_rounds(tiny_npz, tmp_path, **local)
    model = lenet()
    k = vector_size(model, select_parameter_names(model, exclude=[LENET_HEAD, "features.0.*"]))
    assert {size for _, size in seen} == {k}
    assert {name for name, _ in seen} == {protocol.THETA, protocol.DELTA}
    assert len(seen) == 2 * 2 + 2 * 2 * 2 + 2  # rounds 0-2 evaluate, rounds 1-2 train+reply
    assert strategy.history[-1]["clients_trained"] == 2


def test_frozen_layers_give_a_zero_delta_in_exactly_their_slice(tiny_npz, tmp_path):
    node = {"partition-id": 0, "num-partitions": 2, "frozen-layers": LENET_HEAD}
    context = context_for(lenet_config(tiny_npz, tmp_path), node)
    model = lenet()
    k = vector_size(model)
    assert protocol.parse_identity(send(protocol.QUERY, context)).num_params == k
    theta = np.random.default_rng(0).normal(0, 0.05, k).astype(np.float32)
    delta = protocol.parse_train_reply(send(protocol.TRAIN, context, theta), k).delta
    frozen = slice_of(model, LENET_HEAD)
    assert frozen.stop == k  # the last layer: the end of the vector
    assert np.all(delta[frozen] == 0.0)
    assert np.count_nonzero(delta[: frozen.start]) > 0.9 * frozen.start


# ------------------------------------------------------------ top-p uploads
def test_top_p_entries_are_the_largest_and_rebuild_exactly_on_their_support():
    delta = np.random.default_rng(1).normal(size=1001).astype(np.float32)
    indices, values = protocol.top_p_entries(delta, 0.3)
    assert len(indices) == 301 and np.all(np.diff(indices) > 0)
    assert np.abs(delta[indices]).min() >= np.sort(np.abs(delta))[-301]
    reply = Message(protocol.train_reply(delta, 5, 0.1, top_p=0.3), dst_node_id=1,
                    message_type=protocol.TRAIN)  # fmt: skip
    result = protocol.parse_train_reply(reply, 1001)
    assert np.array_equal(result.delta[indices], delta[indices])
    off = np.setdiff1d(np.arange(1001), indices)
    assert np.all(result.delta[off] == 0.0)
    sent = reply.content["arrays"]
    assert set(sent) == {protocol.DELTA_INDICES, protocol.DELTA_VALUES}
    assert result.bytes_up == sum(a.numpy().nbytes for a in sent.values()) == 301 * 8


def test_a_top_p_client_sends_its_dense_delta_on_the_support(tiny_npz, tmp_path):
    node = {"partition-id": 0, "num-partitions": 2}
    k = vector_size(lenet())
    theta = np.random.default_rng(0).normal(0, 0.05, k).astype(np.float32)
    dense_ctx = context_for(lenet_config(tiny_npz, tmp_path), node)
    dense = protocol.parse_train_reply(send(protocol.TRAIN, dense_ctx, theta), k)
    sparse_ctx = context_for(lenet_config(tiny_npz, tmp_path, **{"client.upload": "top_p"}), node)
    reply = send(protocol.TRAIN, sparse_ctx, theta)
    sparse = protocol.parse_train_reply(reply, k)
    support = np.flatnonzero(sparse.delta)
    indices = reply.content["arrays"][protocol.DELTA_INDICES].numpy()
    assert len(indices) == int(np.ceil(0.3 * k))
    assert np.array_equal(sparse.delta[indices], dense.delta[indices])
    assert set(support) <= set(indices)
    assert sparse.bytes_up == 8 * len(indices) < 0.61 * dense.bytes_up


def test_a_run_counts_top_p_uploads_as_they_travel(tiny_npz, tmp_path):
    strategy, seen = run_two_rounds(tiny_npz, tmp_path, **{"client.upload": "top_p"})
    k = vector_size(lenet())
    sent_up = sum(4 * size for name, size in seen if name.startswith("delta-"))
    assert sent_up == 2 * 2 * 8 * int(np.ceil(0.3 * k))
    assert sum(r["bytes_up"] for r in strategy.history) == sent_up
    assert strategy.history[-1]["clients_trained"] == 2
    assert {name for name, _ in seen} == {
        protocol.THETA,
        protocol.DELTA_INDICES,
        protocol.DELTA_VALUES,
    }


def sparse_reply(indices, values):
    arrays = ArrayRecord(
        {protocol.DELTA_INDICES: Array(np.asarray(indices)), protocol.DELTA_VALUES: Array(values)}
    )
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({protocol.NUM_EXAMPLES: 3, "train-loss": 0.5})}
    )
    return Message(content, dst_node_id=1, message_type=protocol.TRAIN)


@pytest.mark.parametrize(
    ("indices", "values", "message"),
    [
        (np.array([1, 1], np.int32), np.ones(2, np.float32), "strictly increasing"),
        (np.array([3, 1], np.int32), np.ones(2, np.float32), "strictly increasing"),
        (np.array([0, 10], np.int32), np.ones(2, np.float32), "outside"),
        (np.array([-1, 2], np.int32), np.ones(2, np.float32), "outside"),
        (np.array([0, 2], np.int32), np.ones(3, np.float32), r"shape \(3,\), expected \(2,\)"),
        (np.array([0, 2], np.int32), np.array([1, np.nan], np.float32), "NaN"),
        (np.array([0, 2], np.float32), np.ones(2, np.float32), "int32"),
        (np.array([0, 2], np.int32), np.ones(2, np.float64), "float32"),
    ],
)
def test_a_bad_sparse_upload_is_refused(indices, values, message):
    with pytest.raises(protocol.ReplyError, match=message):
        protocol.parse_train_reply(sparse_reply(indices, values), 10)
