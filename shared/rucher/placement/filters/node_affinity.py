"""Node affinity (HA rules): a strict rule allows only its nodes.

A non-strict rule removes nothing; its priorities rank nodes (``weighers.affinity``) and the
engine looks at its nodes before the others.
"""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask, Rows
from rucher.placement.view import ClusterView, Selector


def keep(_view: ClusterView, _demand: Demand, _nodes: Selector) -> Mask | None:
    """Nothing to mask: a strict rule narrows the candidates up front."""
    return None


def narrow(_view: ClusterView, demand: Demand) -> Rows | None:
    """The nodes of a strict rule."""
    return next((rows for name, rows in demand.allowed if name == FILTER.name), None)


FILTER = Filter("node-affinity", "not allowed by a strict node-affinity rule", keep, narrow)
