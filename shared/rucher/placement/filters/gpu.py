"""GPU: enough free whole devices (passthrough) or virtual functions of the requested model."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask, Rows, rows_where
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Nodes with enough free devices of every requested kind and model."""
    mask = None
    for column, count in demand.devices:
        enough = view.gpu.dev_free[nodes, column] >= count
        mask = enough if mask is None else mask & enough
    return mask


def narrow(view: ClusterView, demand: Demand) -> Rows | None:
    """Nodes that have the first requested device model at all."""
    if not demand.devices:
        return None
    column = demand.devices[0][0]
    return rows_where(view, ("gpu", column), lambda: view.gpu.dev_total[:, column] > 0)


FILTER = Filter("gpu", "no free GPU or VF of the requested model", keep, narrow)
