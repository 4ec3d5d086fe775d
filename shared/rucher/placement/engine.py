"""Choose a node: narrow, filter window by window, weigh the feasible sample, pick the best.

Cost does not grow with the cluster: filters run over windows of ``Options.window`` rows (a
slice of every column), starting at a window chosen by the VMID, and the scan stops once
``Options.enough`` feasible nodes are found; only those are weighed. A cluster no larger than
one window is always examined whole, so small clusters (and the HA manager) get the exact best
node. A refusal has examined every node, so its explanation is complete.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from rucher.placement.demand import Demand, PlacementError, compile_demand
from rucher.placement.filters import FILTERS
from rucher.placement.view import ClusterView, Selector
from rucher.placement.weighers import WEIGHERS
from rucher.proto.scheduler import FilterOutcome, PlacementPolicy, PlacementSpec

Rows = NDArray[np.intp]

DEFAULT_WEIGHTS: Mapping[str, float] = {
    "spread": 1.0,
    "fragmentation": 1.0,
    "load": 0.25,
    "crs": 1.0,
}
DEFAULT_POLICY = PlacementPolicy()


@dataclass(frozen=True)
class Options:
    """How much of a large cluster one decision looks at, and how weighers count."""

    window: int = 1024
    enough: int = 64
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))


DEFAULT_OPTIONS = Options()


@dataclass(frozen=True)
class Decision:
    """The chosen node, its score, and how the filters narrowed the candidates."""

    node: str
    row: int
    score: float
    outcomes: tuple[FilterOutcome, ...]
    examined: int
    demand: Demand


@dataclass
class _Tally:
    """Nodes each filter removed over the windows examined."""

    removed: list[int]
    active: list[bool]
    examined: int = 0


def place(
    view: ClusterView,
    spec: PlacementSpec,
    policy: PlacementPolicy | None = None,
    options: Options = DEFAULT_OPTIONS,
) -> Decision:
    """The best node for one guest; raises :class:`PlacementError` when none fits."""
    return place_demand(view, compile_demand(view, spec), policy, options)


def place_demand(
    view: ClusterView,
    demand: Demand,
    policy: PlacementPolicy | None = None,
    options: Options = DEFAULT_OPTIONS,
) -> Decision:
    """:func:`place` for an already compiled demand."""
    policy = policy or DEFAULT_POLICY
    total = view.present_count()
    narrowed, source = _narrow(view, demand, total)
    tiers: list[Rows | None] = [source]
    if demand.preferred is not None:
        # Non-strict affinity: the rule's nodes first, the others only if none of them fits.
        preferred = np.sort(demand.preferred)
        first = preferred if source is None else np.intersect1d(source, preferred)
        rest = None if source is None else np.setdiff1d(source, first, assume_unique=True)
        tiers = [first, rest]
    tally = _Tally(removed=[0] * len(FILTERS), active=[False] * len(FILTERS))
    for position, tier in enumerate(tiers):
        feasible = _scan(
            view,
            demand,
            tier,
            options=options,
            tally=tally,
            skip=tiers[0] if position else None,
        )
        if feasible.size:
            row, score = _choose(view, demand, feasible, policy, options)
            return Decision(
                node=view.names[row],
                row=row,
                score=score,
                outcomes=(*narrowed, *_outcomes(tally)),
                examined=tally.examined,
                demand=demand,
            )
    outcomes = (*narrowed, *_outcomes(tally))
    reasons = "; ".join(
        f"{o.filter} removed {o.removed} ({o.reason})" for o in outcomes if o.removed
    )
    raise PlacementError(
        f"no node can run {demand.label} ({total} nodes): {reasons or 'no candidate'}",
        impossible=False,
        outcomes=outcomes,
        examined=tally.examined,
    )


def _narrow(
    view: ClusterView, demand: Demand, total: int
) -> tuple[list[FilterOutcome], Rows | None]:
    outcomes: list[FilterOutcome] = []
    source: Rows | None = None
    remaining = total
    for flt in FILTERS:
        rows = flt.narrow(view, demand)
        if rows is None:
            continue
        source = rows if source is None else np.intersect1d(source, rows, assume_unique=True)
        outcomes.append(
            FilterOutcome(
                filter=flt.name,
                removed=remaining - len(source),
                remaining=len(source),
                reason=flt.reason,
            )
        )
        remaining = len(source)
    return outcomes, source


def _scan(
    view: ClusterView,
    demand: Demand,
    source: Rows | None,
    *,
    options: Options,
    tally: _Tally,
    skip: Rows | None,
) -> Rows:
    """Feasible rows from ``source`` (every row when None), window by window."""
    length = view.size if source is None else len(source)
    width = max(1, options.window)
    windows = -(-length // width)
    gaps = source is None and (view.size != view.present_count() or skip is not None)
    found: list[Rows] = []
    count = 0
    for step in range(windows):
        start = ((demand.vmid + step) % windows) * width
        stop = min(length, start + width)
        nodes: Selector = slice(start, stop) if source is None else source[start:stop]
        mask = None
        if gaps:  # rows of departed nodes (or already examined ones) are no candidates
            mask = view.present[start:stop].copy()
            if skip is not None:
                mask[skip[(skip >= start) & (skip < stop)] - start] = False
        alive = (stop - start) if mask is None else int(np.count_nonzero(mask))
        tally.examined += alive
        for position, flt in enumerate(FILTERS):
            if alive == 0:
                break
            keep = flt.keep(view, demand, nodes)
            if keep is None:
                continue
            tally.active[position] = True
            mask = keep if mask is None else mask & keep
            now = int(np.count_nonzero(mask))
            tally.removed[position] += alive - now
            alive = now
        if alive == 0:
            continue
        if mask is None:
            rows = np.arange(start, stop) if source is None else source[start:stop]
        elif source is None:
            rows = np.flatnonzero(mask) + start
        else:
            rows = source[start:stop][mask]
        found.append(rows)
        count += len(rows)
        if count >= options.enough:
            break
    return np.concatenate(found) if found else np.zeros(0, dtype=np.intp)


def _outcomes(tally: _Tally) -> list[FilterOutcome]:
    remaining = tally.examined
    outcomes = []
    for position, flt in enumerate(FILTERS):
        if not tally.active[position]:
            continue
        remaining -= tally.removed[position]
        outcomes.append(
            FilterOutcome(
                filter=flt.name,
                removed=tally.removed[position],
                remaining=remaining,
                reason=flt.reason,
            )
        )
    return outcomes


def _choose(
    view: ClusterView, demand: Demand, rows: Rows, policy: PlacementPolicy, options: Options
) -> tuple[int, float]:
    total = np.zeros(len(rows))
    for weigher in WEIGHERS:
        if policy.crs is not None and weigher.name != "crs" and not weigher.dominant:
            continue  # a CRS mode decides alone, as in Proxmox
        weight = 1.0 if weigher.dominant else options.weights.get(weigher.name, 0.0)
        if weight == 0.0:
            continue
        scores = weigher.score(view, demand, rows, policy)
        if scores is None:
            continue
        if weigher.dominant:
            top = scores == scores.max()
            rows, total = rows[top], total[top]
            continue
        total += weight * scores
    best = total.max()
    ties = np.flatnonzero(total >= best - 1e-12)
    chosen = ties[np.argmin(view.ranks(rows[ties]))] if len(ties) > 1 else ties[0]
    return int(rows[chosen]), float(total[chosen])
