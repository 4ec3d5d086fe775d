"""Candidates: only the nodes the request names, never the ones it excludes."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask, Rows, outside
from rucher.placement.view import ClusterView, Selector


def keep(_view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Drop excluded nodes (a migration's source, nodes the caller ruled out)."""
    return outside(nodes, demand.excluded) if demand.excluded.size else None


def narrow(_view: ClusterView, demand: Demand) -> Rows | None:
    """The nodes the request names, if it names any."""
    return next((rows for name, rows in demand.allowed if name == FILTER.name), None)


FILTER = Filter("candidates", "not among the requested nodes, or excluded", keep, narrow)
