"""Storage: every storage the guest's disks live on is active and reachable from the node."""

from __future__ import annotations

from rucher.placement.bits import has_all
from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Nodes that reach all the guest's storages."""
    if demand.storages is None:
        return None
    return has_all(view.storage[nodes], demand.storages)


FILTER = Filter("storage", "does not reach the guest's storage", keep)
