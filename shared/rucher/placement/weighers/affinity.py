"""Affinity priority: nodes of a node-affinity rule by priority, above every other node.

Dominant: the engine keeps only the candidates of the highest priority present, then lets the
other weighers choose among them (Proxmox picks the highest-priority group of available nodes).
"""

from __future__ import annotations

import numpy as np

from rucher.placement.demand import Demand
from rucher.placement.view import ClusterView
from rucher.placement.weighers.base import Rows, Scores, Weigher
from rucher.proto.scheduler import PlacementPolicy

UNLISTED = -1.0


def score(view: ClusterView, demand: Demand, rows: Rows, _policy: PlacementPolicy) -> Scores | None:
    """Each candidate's rule priority; nodes outside the rule rank below all of its nodes."""
    if demand.preferred is None or demand.priorities is None:
        return None
    order = np.argsort(demand.preferred)
    listed = demand.preferred[order]
    positions = np.minimum(np.searchsorted(listed, rows), len(listed) - 1)
    found = listed[positions] == rows
    priorities = demand.priorities[order][positions].astype(np.float64)
    return np.where(found, priorities, UNLISTED)


WEIGHER = Weigher("affinity", score, dominant=True)
