"""MIG: a free legal placement of the requested profile on one of the node's MIG GPUs."""

from __future__ import annotations

from rucher.placement.demand import Demand
from rucher.placement.filters.base import Filter, Mask, Rows, rows_where
from rucher.placement.view import ClusterView, Selector


def keep(view: ClusterView, demand: Demand, nodes: Selector) -> Mask | None:
    """Nodes whose GPUs can still host the requested MIG instances at legal placements."""
    mask = None
    tables = view.mig.tables
    for profile, count in demand.migs:
        states = view.gpu.mig[nodes]
        if count == 1:
            fits = tables.fit[profile][states].any(axis=1)
        else:
            fits = tables.cap[profile][states].sum(axis=1) >= count
        mask = fits if mask is None else mask & fits
    return mask


def narrow(view: ClusterView, demand: Demand) -> Rows | None:
    """Nodes with a MIG GPU whose model offers the first requested profile."""
    if not demand.migs:
        return None
    profile = demand.migs[0][0]
    return rows_where(
        view,
        ("mig", profile),
        lambda: view.mig.tables.has[profile][view.gpu.mig].any(axis=1),
    )


FILTER = Filter("mig", "no free legal placement for the MIG profile", keep, narrow)
