"""Spread or pack: the most free room left after placing (spread), or the least (pack)."""

from __future__ import annotations

import numpy as np

from rucher.placement.demand import Demand
from rucher.placement.view import ClusterView
from rucher.placement.weighers.base import Rows, Scores, Weigher
from rucher.proto.scheduler import PlacementPolicy, PlacementStrategy


def score(view: ClusterView, demand: Demand, rows: Rows, policy: PlacementPolicy) -> Scores:
    """The share of memory and vCPUs still free once the guest is placed, averaged."""
    memory = (view.mem_free[rows] - demand.memory) / np.maximum(view.mem_total[rows], 1)
    vcpus = (view.vcpu_free[rows] - demand.vcpus) / np.maximum(view.vcpu_total[rows], 1.0)
    room = (memory + vcpus) / 2.0  # feasible nodes keep between none and all of their room
    return room if policy.strategy is PlacementStrategy.SPREAD else 1.0 - room


WEIGHER = Weigher("spread", score)
