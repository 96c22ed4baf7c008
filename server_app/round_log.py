"""What a round measured (a line of metrics.jsonl) and the run's summary (SPEC section 7)."""

from __future__ import annotations

import logging
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

    def reject(self, who: str, reason: str) -> None:
        logger.warning("round %d: rejected reply from %s: %s", self.round, who, reason)
        self.rejected.append({"client": who, "reason": reason})

    def row(self) -> dict[str, Any]:
        values = dict(self.values)
        row: dict[str, Any] = {"round": self.round}
        for key in LEADING[1:]:
            row[key] = values.pop(key, None)
        row["seconds"] = time.perf_counter() - self.started
        row["bytes_down"] = self.bytes_down
        row["bytes_up"] = self.bytes_up
        row.update(values)
        row["rejected"] = self.rejected
        return row


def run_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best pooled accuracy, each labelled with its round (SPEC section 7)."""
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
    return summary
