"""What every weigher is: a name, a scoring function over candidate rows, and its precedence."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from rucher.placement.demand import Demand
from rucher.placement.view import ClusterView
from rucher.proto.scheduler import PlacementPolicy

Scores = NDArray[np.float64]
Rows = NDArray[np.intp]


class Weigher(NamedTuple):
    """One weigher; ``score`` returns None when the request or policy does not concern it."""

    name: str
    score: Callable[[ClusterView, Demand, Rows, PlacementPolicy], Scores | None]
    dominant: bool = False


def scaled(values: Scores) -> Scores:
    """Values mapped linearly onto [0, 1] (all ones when they are all equal)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.ones_like(values)
    return (values - low) / (high - low)
