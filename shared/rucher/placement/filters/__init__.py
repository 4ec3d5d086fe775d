"""Filters: each removes, over the whole candidate set at once, the nodes that cannot take a guest.

A filter's ``keep`` gets the candidates as a slice of rows or an array of row indexes and returns
a boolean mask over them, or None when the request does not concern it. A filter that can name
a small set of possible nodes up front (strict node affinity, a GPU model) also has ``narrow``:
the engine then scans only that set. Order matters only for the explanation: cheap and broad
filters first.
"""

from __future__ import annotations

from rucher.placement.filters import (
    candidates,
    cpu,
    gpu,
    mdev,
    mig,
    node_affinity,
    online,
    pci_mapping,
    resource_affinity,
    resources,
    storage,
)
from rucher.placement.filters.base import Filter, Mask, outside

FILTERS: tuple[Filter, ...] = (
    online.FILTER,
    candidates.FILTER,
    node_affinity.FILTER,
    resource_affinity.FILTER,
    resources.FILTER,
    cpu.FILTER,
    storage.FILTER,
    gpu.FILTER,
    mdev.FILTER,
    mig.FILTER,
    pci_mapping.FILTER,
)

__all__ = ["FILTERS", "Filter", "Mask", "outside"]
