"""The ClientApp: what it reports, what it sends back, and the state it keeps between rounds."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from client_app.app import app as client_app
from client_app.session import BUFFERS
from client_app.spec import NodeConfigError, client_spec
from common import protocol
from common.config import resolve_config
from common.models import build_model
from common.param_vector import model_to_vector, vector_size
from simulation.grid import InProcessGrid


def run_config(tiny_npz, tmp_path, **extra):
    return {
        "experiment": "default",
        "data.source": f"npz:{tiny_npz}",
        "data.classes_per_client": 2,
        "data.normalize": "none",
        "data.cache_dir": str(tmp_path / "cache"),
        "clients.models": "resnet10,lenet",
        "client.epochs": 1,
        **extra,
    }


def context_for(run_cfg, node_config):
    grid = InProcessGrid(client_app, [node_config], run_cfg)  # sets the task identity
    return grid.contexts[1000]


def send(message_type, context, theta=None, server_round=1):
    content = protocol.instruction(theta, server_round) if theta is not None else RecordDict()
    message = Message(content, dst_node_id=context.node_id, message_type=message_type)
    message.metadata.__dict__["_message_id"] = "m1"
    return client_app(message, context)


def test_query_reports_key_and_k_of_the_assigned_model(tiny_npz, tmp_path):
    context = context_for(run_config(tiny_npz, tmp_path), {"partition-id": 1, "num-partitions": 2})
    identity = protocol.parse_identity(send(protocol.QUERY, context))
    expected = vector_size(build_model("lenet", num_classes=4, in_channels=1))
    assert (identity.client_key, identity.num_params) == ("partition-1", expected)
    assert len(identity.proof) >= protocol.MIN_PROOF_LENGTH


def test_node_config_chooses_model_and_key(tiny_npz, tmp_path):
    node = {"partition-id": 1, "num-partitions": 2, "model": "mlp", "client-key": "hospital-7"}
    context = context_for(run_config(tiny_npz, tmp_path), node)
    identity = protocol.parse_identity(send(protocol.QUERY, context))
    expected = vector_size(build_model("mlp", num_classes=4, in_channels=1))
    assert (identity.client_key, identity.num_params) == ("hospital-7", expected)


def test_a_client_proves_its_key_with_the_same_secret_after_a_restart(tiny_npz, tmp_path):
    """Generated once into the state dir (or set as node config client-secret), the secret
    is the same in every query and after the SuperNode restarts (a new, empty context)."""
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "state")}
    config = run_config(tiny_npz, tmp_path)
    proofs = []
    for _ in range(2):  # two SuperNode lives
        context = context_for(config, node)
        for _ in range(2):
            proofs.append(protocol.parse_identity(send(protocol.QUERY, context)).proof)
    assert len(set(proofs)) == 1
    other = context_for(config, {**node, "partition-id": 1})
    assert protocol.parse_identity(send(protocol.QUERY, other)).proof != proofs[0]
    given = context_for(config, {**node, "client-secret": "correct-horse-battery-staple"})
    assert (
        protocol.parse_identity(send(protocol.QUERY, given)).proof == "correct-horse-battery-staple"
    )


def test_train_returns_old_minus_new_and_keeps_batchnorm_statistics(tiny_npz, tmp_path):
    context = context_for(run_config(tiny_npz, tmp_path), {"partition-id": 0, "num-partitions": 2})
    model = build_model("resnet10", num_classes=4, in_channels=1)
    theta = model_to_vector(model).numpy()
    reply = send(protocol.TRAIN, context, theta)
    result = protocol.parse_train_reply(reply, len(theta))
    assert result.num_examples > 0 and np.abs(result.delta).max() > 0
    first = context.state[BUFFERS].to_torch_state_dict()
    assert any(k.endswith("running_mean") for k in first)
    tracked = [k for k in first if k.endswith("num_batches_tracked")]
    batches = int(first[tracked[0]])
    send(protocol.TRAIN, context, theta, server_round=2)
    second = context.state[BUFFERS].to_torch_state_dict()
    # statistics continue from the saved ones instead of starting again
    assert int(second[tracked[0]]) == 2 * batches


def test_evaluate_reports_counts_on_the_test_split(tiny_npz, tmp_path):
    context = context_for(run_config(tiny_npz, tmp_path), {"partition-id": 1, "num-partitions": 2})
    model = build_model("lenet", num_classes=4, in_channels=1)
    result = protocol.parse_evaluate_reply(
        send(protocol.EVALUATE, context, model_to_vector(model).numpy())
    )
    assert result.num_examples > 0 and 0 <= result.correct <= result.num_examples


def test_a_vector_of_the_wrong_size_is_an_error_not_a_silent_reshape(tiny_npz, tmp_path):
    context = context_for(run_config(tiny_npz, tmp_path), {"partition-id": 1, "num-partitions": 2})
    with pytest.raises(ValueError, match="length"):
        send(protocol.TRAIN, context, np.zeros(10, np.float32))


@pytest.mark.parametrize(
    ("node_config", "data_clients", "message"),
    [
        ({"num-partitions": 4}, "auto", "partition-id"),
        ({"partition-id": 0}, "auto", "num-partitions"),
        ({"partition-id": 5, "num-partitions": 4}, "auto", "outside"),
        ({"partition-id": 0, "num-partitions": 4}, 10, "num-supernodes=10"),
        ({"partition-id": "x", "num-partitions": 4}, "auto", "integer"),
    ],
)
def test_bad_node_config_says_what_to_set(node_config, data_clients, message):
    cfg = resolve_config("default", {"data.num_clients": data_clients})
    with pytest.raises(NodeConfigError, match=message):
        client_spec(node_config, cfg)


def test_message_log_records_what_arrived(tiny_npz, tmp_path):
    log = tmp_path / "received.jsonl"
    node = {"partition-id": 1, "num-partitions": 2, "message-log": str(log)}
    context = context_for(run_config(tiny_npz, tmp_path), node)
    model = build_model("lenet", num_classes=4, in_channels=1)
    theta = model_to_vector(model).numpy()
    send(protocol.EVALUATE, context, theta, server_round=3)
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["round"] == 3 and entry["type"] == "evaluate"
    assert entry["sha256"] == hashlib.sha256(theta.tobytes()).hexdigest()
