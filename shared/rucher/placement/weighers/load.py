"""Current load: prefer nodes whose CPUs are measured least busy now."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.view import ClusterView
from rucher.placement.weighers.base import Rows, Scores, Weigher
from rucher.proto.scheduler import PlacementPolicy


def score(view: ClusterView, _demand: Demand, rows: Rows, _policy: PlacementPolicy) -> Scores:
    """One minus the measured CPU usage share."""
    return 1.0 - view.cpu_load[rows]


WEIGHER = Weigher("load", score)
