"""Mdev: enough free instances of the requested mediated-device (vGPU) type."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask, Rows, rows_where
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Nodes with enough available instances of every requested mdev type."""
    mask = None
    for column, count in demand.mdevs:
        enough = view.gpu.mdev_free[nodes, column] >= count
        mask = enough if mask is None else mask & enough
    return mask


def narrow(view: ClusterView, demand: Demand) -> Rows | None:
    """Nodes that offer the first requested mdev type at all."""
    if not demand.mdevs:
        return None
    column = demand.mdevs[0][0]
    return rows_where(view, ("mdev", column), lambda: view.gpu.mdev_total[:, column] > 0)


FILTER = Filter("mdev", "no free instance of the requested mdev type", keep, narrow)
