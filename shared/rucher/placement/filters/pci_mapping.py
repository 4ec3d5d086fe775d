"""PCI mapping: the named resource mapping has a free device on the node."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask, Rows, rows_where
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Nodes where every requested mapping still has enough free devices."""
    mask = None
    for column, count in demand.mappings:
        enough = view.gpu.map_free[nodes, column] >= count
        mask = enough if mask is None else mask & enough
    return mask


def narrow(view: ClusterView, demand: Demand) -> Rows | None:
    """Nodes the first requested mapping has an entry for."""
    if not demand.mappings:
        return None
    column = demand.mappings[0][0]
    return rows_where(view, ("mapping", column), lambda: view.gpu.map_total[:, column] > 0)


FILTER = Filter("pci-mapping", "the PCI mapping has no free device there", keep, narrow)
