"""Online: the node's agents are registered and it is not in maintenance."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, _demand: Demand, nodes: Selector) -> Mask:
    """Nodes open to new guests."""
    return view.schedulable[nodes]


FILTER = Filter("online", "offline or in maintenance", keep)
