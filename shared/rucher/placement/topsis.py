"""TOPSIS multi-criteria scoring, the way Proxmox's resource scheduling computes it."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def topsis(matrix: NDArray[np.float64], weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """Score each row (alternative) in [0, 1], higher is better.

    ``weights`` has one entry per column (criterion): its size is the importance, its sign says
    whether larger (positive) or smaller (negative) values are better. Columns are normalised by
    their L2 norm, and a row scores its weighted distance to the ideal worst row divided by the
    sum of its distances to the ideal best and worst rows.
    """
    norms = np.sqrt((matrix * matrix).sum(axis=0))
    normalized = matrix / np.where(norms == 0.0, 1.0, norms)
    importance = np.abs(weights) / np.abs(weights).sum()
    maximize = weights >= 0
    highest, lowest = normalized.max(axis=0), normalized.min(axis=0)
    best = np.where(maximize, highest, lowest)
    worst = np.where(maximize, lowest, highest)
    to_best = np.sqrt((((normalized - best) * importance) ** 2).sum(axis=1))
    to_worst = np.sqrt((((normalized - worst) * importance) ** 2).sum(axis=1))
    total = to_best + to_worst
    scores: NDArray[np.float64] = np.divide(
        to_worst, total, out=np.zeros_like(total), where=total != 0.0
    )
    return scores
