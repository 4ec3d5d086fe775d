"""CPU: the guest's architecture, and every CPU flag it requires."""

from __future__ import annotations

from rucher.placement.bits import has_all
from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Nodes of the right architecture with all the required flags."""
    mask = None
    if len(view.archs) > 1:  # a single-architecture cluster needs no check
        mask = view.arch[nodes] == demand.arch
    if demand.flags is not None:
        flags = has_all(view.cpu_flags[nodes], demand.flags)
        mask = flags if mask is None else mask & flags
    return mask


FILTER = Filter("cpu", "other CPU architecture or missing CPU flags", keep)
