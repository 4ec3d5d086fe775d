"""Rebalancing: a bounded list of moves, each lowering the cluster's imbalance the most.

Imbalance is Proxmox's measure: the coefficient of variation of the nodes' loads divided by its
maximum, sqrt(n - 1), so 0 is perfectly even and 1 is everything on one node. A node's load is
the larger of its vCPU and memory shares. Each round tries the guests of the most loaded nodes
(largest first; guests with devices stay, they cannot live-migrate), places each elsewhere with
the normal filters and weighers, and keeps the move that gains most. The view is left as found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from rucher.placement.demand import PlacementError
from rucher.placement.engine import DEFAULT_OPTIONS, Options
from rucher.placement.group import suggest_migration
from rucher.placement.view import ClusterView, Reservation
from rucher.proto.scheduler import PlacementPolicy, PlacementSpec, RebalanceMove

SOURCES_PER_ROUND = 3
GUESTS_PER_SOURCE = 16
MIN_GAIN = 1e-9


@dataclass(frozen=True)
class Plan:
    """Moves, best first, with the imbalance before and after all of them."""

    moves: tuple[RebalanceMove, ...]
    imbalance_before: float
    imbalance_after: float


def imbalance(loads: NDArray[np.float64]) -> float:
    """Proxmox's node imbalance: coefficient of variation over its maximum, in [0, 1]."""
    count = len(loads)
    total = float(loads.sum())
    if count < 2 or total <= 0.0:
        return 0.0
    mean = total / count
    spread = math.sqrt(max(0.0, float((loads * loads).sum()) / count - mean * mean))
    return spread / mean / math.sqrt(count - 1)


def loads(view: ClusterView, rows: NDArray[np.intp]) -> NDArray[np.float64]:
    """Each row's load: the larger of its vCPU share and memory share."""
    vcpu = view.vcpu_used[rows] / np.maximum(view.vcpu_total[rows], 1.0)
    memory = view.mem_used[rows] / np.maximum(view.mem_total[rows], 1)
    return np.maximum(vcpu, memory)


def _spec(reservation: Reservation, nodes: Sequence[str]) -> PlacementSpec:
    return PlacementSpec(
        vmid=reservation.vmid,
        guest_type=reservation.guest_type,
        resources=reservation.resources,
        candidates=tuple(nodes),
        node_affinity=reservation.node_affinity,
        resource_affinity=reservation.resource_affinity,
    )


def rebalance_plan(
    view: ClusterView,
    max_moves: int,
    nodes: Sequence[str] = (),
    policy: PlacementPolicy | None = None,
    options: Options = DEFAULT_OPTIONS,
) -> Plan:
    """Up to ``max_moves`` moves that each lower the imbalance of ``nodes`` (default: all)."""
    if nodes:
        rows = np.array(sorted(view.index[n] for n in nodes if n in view.index), dtype=np.intp)
    else:
        rows = view.live()
    rows = rows[view.schedulable[rows]]
    names = [view.names[row] for row in rows] if nodes else []
    position = {int(row): index for index, row in enumerate(rows)}
    current = loads(view, rows)
    before = imbalance(current)
    moves: list[RebalanceMove] = []
    applied: list[tuple[int, int, Reservation]] = []
    try:
        for _ in range(max_moves):
            best = _best_move(
                view,
                rows,
                current,
                names=names,
                position=position,
                policy=policy,
                options=options,
            )
            if best is None:
                break
            gain, source, target, reservation = best
            view.release(source, reservation.key)
            view.reserve(target, reservation)
            applied.append((source, target, reservation))
            current[position[source]] = loads(view, np.array([source]))[0]
            current[position[target]] = loads(view, np.array([target]))[0]
            moves.append(
                RebalanceMove(
                    vmid=reservation.vmid,
                    guest_type=reservation.guest_type,
                    source=view.names[source],
                    target=view.names[target],
                    gain=gain,
                )
            )
        after = imbalance(current)
    finally:
        for source, target, reservation in reversed(applied):
            view.release(target, reservation.key)
            view.reserve(source, reservation)
    return Plan(moves=tuple(moves), imbalance_before=before, imbalance_after=after)


def _best_move(
    view: ClusterView,
    rows: NDArray[np.intp],
    current: NDArray[np.float64],
    *,
    names: list[str],
    position: dict[int, int],
    policy: PlacementPolicy | None,
    options: Options,
) -> tuple[float, int, int, Reservation] | None:
    base = imbalance(current)
    best: tuple[float, int, int, Reservation] | None = None
    for index in np.argsort(-current)[:SOURCES_PER_ROUND]:
        source = int(rows[index])
        movable = [r for r in view.reservations(source) if not r.resources.gpus]
        movable.sort(key=lambda r: -r.resources.memory)
        for reservation in movable[:GUESTS_PER_SOURCE]:
            view.release(source, reservation.key)
            try:
                decision = suggest_migration(
                    view, _spec(reservation, names), view.names[source], policy, options
                )
            except PlacementError:
                continue
            finally:
                view.reserve(source, reservation)
            target = decision.row
            if target not in position:
                continue
            trial = current.copy()
            trial[position[source]] = _load_without(view, source, reservation)
            trial[position[target]] = _load_with(view, target, reservation)
            gain = base - imbalance(trial)
            if gain > MIN_GAIN and (best is None or gain > best[0]):
                best = (gain, source, target, reservation)
    return best


def _load_without(view: ClusterView, row: int, reservation: Reservation) -> float:
    vcpu = (view.vcpu_used[row] - reservation.resources.vcpus) / max(view.vcpu_total[row], 1.0)
    memory = (view.mem_used[row] - reservation.resources.memory) / max(view.mem_total[row], 1)
    return float(max(vcpu, memory))


def _load_with(view: ClusterView, row: int, reservation: Reservation) -> float:
    vcpu = (view.vcpu_used[row] + reservation.resources.vcpus) / max(view.vcpu_total[row], 1.0)
    memory = (view.mem_used[row] + reservation.resources.memory) / max(view.mem_total[row], 1)
    return float(max(vcpu, memory))
