"""Resources: enough free vCPUs (after the overcommit ratio) and memory."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, demand: Demand, nodes: Selector) -> Mask:
    """Nodes with room for the guest's vCPUs and memory."""
    return (view.mem_free[nodes] >= demand.memory) & (view.vcpu_free[nodes] >= demand.vcpus)


FILTER = Filter("resources", "not enough free vCPUs or memory", keep)
