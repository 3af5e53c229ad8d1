"""Training gauges through ``ray.util.metrics`` (Ray exports them as ``ray_grand_train_*``).

Named like the pipeline's (``grand_pipeline.metrics.METRIC_NAMES``: a ``grand_`` prefix that the
shipped Prometheus config keeps). Set by rank 0 once per step, only inside a Ray process; elsewhere
:meth:`TrainMetrics.create` gives an object whose calls do nothing.
"""

from __future__ import annotations

import sys
from typing import Any

TRAIN_METRIC_NAMES = {
    "loss": "grand_train_loss",
    "samples_per_s": "grand_train_samples_per_s",
    "lr": "grand_train_lr",
    "step": "grand_train_step",
}

_HELP = {
    "loss": "Training loss of the last optimiser step (mean over micro-batches and ranks).",
    "samples_per_s": "Global training items per second of the last step, data loading included.",
    "lr": "Learning rate of the last optimiser step.",
    "step": "Optimiser steps done.",
}


class TrainMetrics:
    """Gauges for one training run; ``gauges`` is empty outside Ray."""

    def __init__(self, gauges: dict[str, Any]) -> None:
        self.gauges = gauges

    @classmethod
    def create(cls) -> TrainMetrics:
        ray = sys.modules.get("ray")  # never import Ray just to find out it is not running
        if ray is None or not ray.is_initialized():
            return cls({})
        from ray.util import metrics

        return cls({key: metrics.Gauge(name, _HELP[key]) for key, name in TRAIN_METRIC_NAMES.items()})

    def record(self, record: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(float(record[key]))
