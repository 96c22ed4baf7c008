"""Run `flwr run` against a private local SuperLink and leave no process behind.

The helpers live in experiments/flower.py (the experiment runner uses them too).
"""

from __future__ import annotations

from experiments.flower import ROOT, flower_env, flwr_run, private_flower

__all__ = ["ROOT", "flower_env", "flwr_run", "private_flower"]
