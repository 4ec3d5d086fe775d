"""What every filter is: a name, a reason, a mask function and an optional narrowing."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from rucher.placement.demand import Demand
from rucher.placement.view import ClusterView, Selector

Mask = NDArray[np.bool_]
Rows = NDArray[np.intp]


def no_narrowing(_view: ClusterView, _demand: Demand) -> Rows | None:
    """The default: a filter that cannot name its possible nodes up front."""
    return None


class Filter(NamedTuple):
    """One filter: ``keep`` masks candidates, ``narrow`` names the only possible nodes."""

    name: str
    reason: str
    keep: Callable[[ClusterView, Demand, Selector], Mask | None]
    narrow: Callable[[ClusterView, Demand], Rows | None] = no_narrowing


def outside(nodes: Selector, rows: Rows) -> Mask:
    """A mask over ``nodes`` that is False exactly at the given (sorted) rows."""
    if isinstance(nodes, slice):
        start, stop = nodes.start or 0, nodes.stop
        mask = np.ones(stop - start, dtype=np.bool_)
        inside = rows[(rows >= start) & (rows < stop)]
        mask[inside - start] = False
        return mask
    return ~np.isin(nodes, rows, assume_unique=True)


def rows_where(
    view: ClusterView, key: tuple[object, ...], column: Callable[[], NDArray[np.bool_]]
) -> Rows:
    """Present rows where ``column()`` holds, cached until capacity or inventories change."""
    cached = view.narrowing.get(key)
    if cached is not None and cached[0] == view.epoch:
        return cached[1]
    rows = np.flatnonzero(column()[: view.size] & view.present[: view.size])
    view.narrowing[key] = (view.epoch, rows)
    return rows
