"""Resource affinity (HA rules): run with the guests of a positive rule, apart from a negative's."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask, Rows, outside
from rucher.placement.view import ClusterView, Selector


def keep(_view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Drop nodes running a guest this one must stay apart from."""
    return outside(nodes, demand.apart) if demand.apart.size else None


def narrow(_view: ClusterView, demand: Demand) -> Rows | None:
    """The node of the guests this one must run with, once they run somewhere."""
    return next((rows for name, rows in demand.allowed if name == FILTER.name), None)


FILTER = Filter(
    "resource-affinity", "runs a guest to keep apart from, or not the guests to join", keep, narrow
)
