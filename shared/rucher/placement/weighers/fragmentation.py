"""Least GPU fragmentation: keep large MIG profiles possible, and GPU nodes for GPU guests.

For a MIG request, a node scores by the placement potential its best GPU loses (see
``rucher.placement.mig``): a GPU already cut up loses less than an empty one, where a 1g slice
would end every 7g and 4g placement. A guest that needs no GPU prefers nodes without GPUs, so
their CPUs and memory stay free for the guests that need the GPUs.
"""

from __future__ import annotations

import numpy as np

from rucher.placement.demand import Demand
from rucher.placement.view import ClusterView
from rucher.placement.weighers.base import Rows, Scores, Weigher, scaled
from rucher.proto.scheduler import PlacementPolicy


def score(view: ClusterView, demand: Demand, rows: Rows, _policy: PlacementPolicy) -> Scores | None:
    """Less potential lost scores higher; without a GPU request, GPU-less nodes score 1."""
    if demand.migs:
        tables = view.mig.tables
        states = view.gpu.mig[rows]
        lost = np.zeros(len(rows))
        for profile, _count in demand.migs:
            lost += tables.loss[profile][states].min(axis=1)
        finite = np.isfinite(lost)
        if not finite.any():
            return None
        return 1.0 - scaled(np.where(finite, lost, lost[finite].max()))
    if demand.devices or demand.mdevs or demand.mappings:
        return None  # whole devices and mdev instances do not fragment
    return (~view.gpu.has_gpu[rows]).astype(np.float64)


WEIGHER = Weigher("fragmentation", score)
