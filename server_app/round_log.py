"""What a round measured (a line of metrics.jsonl) and the run's summary
(docs/concepts/metrics.md)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("flwr.mh_pfedhn")

#: The leading columns of every metrics.jsonl row, in this order.
LEADING = ("round", "accuracy", "accuracy_client_mean", "loss")


@dataclass
class RoundLog:
    """The round in progress: methods add values, the exchange counts bytes, refusals are
    kept with their reasons."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    seconds: float | None = None  # fixed by close(); until then, the time since `started`
    exchanges: int = 0  # message exchanges with clients (push, then pull until answered)
    exchange_seconds: float = 0.0  # their wall time, from push to the last reply
    client_timings: list[dict[str, float]] = field(default_factory=list)  # protocol timings

    def absorb(self, values: dict[str, Any], exchanges: list[Any]) -> None:
        """A part of the round's work: its metrics (bytes_up counts into the round's total)
        and its exchanges (server_app/round_loop.Exchanged) with what they cost."""
        values = dict(values)
        self.bytes_up += values.pop("bytes_up", 0)
        self.values.update(values)
        for exchange in exchanges:
            if not exchange.sent:
                continue
            self.exchanges += 1
            self.exchange_seconds += exchange.seconds
            self.bytes_down += exchange.bytes_down
            self.client_timings += exchange.timings

    def close(self) -> None:
        """The round's work is done (its evaluation may still arrive with the next round)."""
        self.seconds = time.perf_counter() - self.started

    def row(self) -> dict[str, Any]:
        values = dict(self.values)
        row: dict[str, Any] = {"round": self.round}
        for key in LEADING[1:]:
            row[key] = values.pop(key, None)
        row["seconds"] = (
            time.perf_counter() - self.started if self.seconds is None else self.seconds
        )
        row["bytes_down"] = self.bytes_down
        row["bytes_up"] = self.bytes_up
        row["exchanges"] = self.exchanges
        row["exchange_seconds"] = self.exchange_seconds
        if self.client_timings:  # mean seconds per reply: where the clients' time went
            names = sorted({name for t in self.client_timings for name in t})
            row["client_seconds"] = {
                n: sum(t[n] for t in self.client_timings if n in t)
                / sum(n in t for t in self.client_timings)
                for n in names
            }
        row.update(values)
        row["rejected"] = self.rejected
        return row


def pending_state(log: RoundLog | None) -> dict[str, Any] | None:
    """A round that awaits its evaluation, as a checkpoint keeps it."""
    if log is None:
        return None
    return {"round": log.round, "seconds": log.seconds, "bytes_down": log.bytes_down,
            "bytes_up": log.bytes_up, "values": log.values, "rejected": log.rejected,
            "exchanges": log.exchanges, "exchange_seconds": log.exchange_seconds,
            "client_timings": log.client_timings}  # fmt: skip


def pending_from_state(state: dict[str, Any] | None) -> RoundLog | None:
    return None if state is None else RoundLog(**state)


def run_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best pooled accuracy, each labelled with its round (docs/concepts/metrics.md)."""
    evaluated = [r for r in history if r.get("accuracy") is not None]
    summary: dict[str, Any] = {
        "rounds": max((r["round"] for r in history), default=0),
        "total_seconds": sum(r["seconds"] for r in history),
        "total_bytes_down": sum(r["bytes_down"] for r in history),
        "total_bytes_up": sum(r["bytes_up"] for r in history),
    }
    if evaluated:
        final = evaluated[-1]
        best = max(evaluated, key=lambda r: r["accuracy"])
        summary.update(
            final_accuracy=final["accuracy"],
            final_round=final["round"],
            final_accuracy_client_mean=final["accuracy_client_mean"],
            best_accuracy=best["accuracy"],
            best_round=best["round"],
            best_selected_by="highest pooled test accuracy over rounds (as the authors' code)",
        )
    rejections = rejections_by_client(history)
    if rejections:
        summary["rejected"] = rejections
    selected = select_by_validation(history)
    if selected is not None:
        summary.update(
            selected_accuracy=selected["accuracy"],
            selected_round=selected["round"],
            selected_val_accuracy=selected["val_accuracy"],
            selected_by=SELECTED_BY,
        )
    return summary


def rejections_by_client(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each client (and phase) whose replies were refused: how many, in which rounds
    (first and last) and the last reason, so an operator sees a misbehaving site in the
    summary instead of in each round's row."""
    out: dict[str, dict[str, Any]] = {}
    for row in history:
        for record in row.get("rejected") or []:
            entry = out.setdefault(
                rejection_label(record),
                {"client": record["client"], "count": 0, "first_round": row["round"]},
            )
            entry["count"] += 1
            entry["last_round"] = row["round"]
            entry["last_reason"] = record["reason"]
    return out


def rejection_label(record: dict[str, str]) -> str:
    """How a refusal names its reply: the client, and its phase if the round has several."""
    phase = record.get("phase")
    return f"{record['client']} ({phase} phase)" if phase else record["client"]


SELECTED_BY = (
    "highest pooled validation accuracy (among equals the lowest validation loss, then the "
    "earliest round); test accuracy reported there"
)


def select_by_validation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluated round of highest pooled validation accuracy, or None when the run has no
    validation split.

    Accuracy moves in steps of one validation example, so equal rounds are common (7 of the 60
    Table 7 seed runs) and the choice among them can swing the test accuracy by 0.7 points.
    They are told apart by the lower validation loss, still on validation data only (a missing
    or non-finite one ranks last), and then by the earlier round.
    """
    rows = [r for r in history
            if r.get("val_accuracy") is not None and r.get("accuracy") is not None]  # fmt: skip
    if not rows:
        return None

    def rank(row: dict[str, Any]) -> tuple[float, float, int]:
        loss = row.get("val_loss")
        finite = isinstance(loss, int | float) and math.isfinite(loss)
        return row["val_accuracy"], -(loss if finite else math.inf), -row["round"]

    return max(rows, key=rank)
