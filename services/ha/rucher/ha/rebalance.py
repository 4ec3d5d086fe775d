"""Automatic rebalancing (``ha-auto-rebalance``): one migration at a time, the one that helps most.

The nodes' imbalance is the coefficient of variation of their loads, a node's load being the mean
of its CPU and memory shares (the figures Proxmox's manager logs). When it stays above the
threshold for the hold duration (in manager rounds, counted while no service moves), the manager
tries every running service on every other node it may use and queues the migration that lowers
the imbalance most, if it lowers it by at least the margin. The candidates' usage comes from the
same CRS usage the placement scores use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rucher.ha import disarm
from rucher.ha.model import ServiceConfig
from rucher.ha.rules import get_node_affinity, get_resource_affinity
from rucher.placement.rebalance import imbalance
from rucher.placement.topsis import topsis
from rucher.placement.weighers.crs import CRITERIA

if TYPE_CHECKING:
    from rucher.ha.manager import Manager

BUSY_STATES = frozenset({"migrate", "relocate", "request_start_balance", "fence", "recovery"})


def _imbalance(cpu: dict[str, float], mem: dict[str, float], manager: Manager) -> float:
    """Coefficient of variation of the nodes' loads, a load being its mean CPU and memory share."""
    loads = []
    for node in manager.usage.nodes:
        cap = manager.env.node_capacity(node)
        loads.append((cpu[node] / max(cap.maxcpu, 1.0) + mem[node] / max(cap.maxmem, 1.0)) / 2)
    # The shared measure divides the variation by its maximum, sqrt(n - 1); Proxmox logs it whole.
    return imbalance(np.array(loads, dtype=np.float64)) * math.sqrt(max(len(loads) - 1, 1))


@dataclass(frozen=True)
class Candidate:
    """One possible migration and the per-node CPU and memory shares it would leave."""

    sid: str
    node: str
    after: float
    cpu_shares: tuple[float, ...]
    mem_shares: tuple[float, ...]


def _shares(manager: Manager, used: dict[str, float], cpu: bool) -> tuple[float, ...]:
    result = []
    for node in manager.usage.nodes:
        cap = manager.env.node_capacity(node)
        result.append(used[node] / max(cap.maxcpu if cpu else cap.maxmem, 1.0))
    return tuple(result)


def _candidates(manager: Manager, services: dict[str, ServiceConfig]) -> list[Candidate]:
    """Every running service on every other node its rules allow, in a stable order."""
    usage = manager.usage
    online = set(usage.nodes)
    found = []
    moved: set[str] = set()
    for sid in sorted(manager.ss):
        data = manager.ss[sid]
        if sid in moved or sid not in services or data.state != "started":
            continue
        if data.node not in online:
            continue
        group = sorted({sid} | manager.rules.positive.get(sid, set()))
        moved.update(group)
        members = [manager.ss.get(member) for member in group]
        if any(m is None or m.state != "started" or m.node != data.node for m in members):
            continue
        allowed = set(online)
        separate: set[str] = set()
        for member in group:
            allowed &= get_node_affinity(manager.rules, member, online)[0]
            separate |= get_resource_affinity(manager.rules, member, manager.ss, online)[1]
        demand = [0.0, 0.0]
        for member in group:
            stats = manager.env.resource_stats(member)
            dynamic = usage.mode == "dynamic"
            demand[0] += stats.cpu if dynamic else stats.maxcpu
            demand[1] += stats.mem if dynamic else stats.maxmem
        for node in sorted(allowed - {data.node} - separate):
            cpu, mem = dict(usage.cpu), dict(usage.mem)
            cpu[data.node] -= demand[0]
            mem[data.node] -= demand[1]
            cpu[node] += demand[0]
            mem[node] += demand[1]
            found.append(
                Candidate(
                    sid=sid,
                    node=node,
                    after=_imbalance(cpu, mem, manager),
                    cpu_shares=_shares(manager, cpu, cpu=True),
                    mem_shares=_shares(manager, mem, cpu=False),
                )
            )
    return found


def _topsis_choice(manager: Manager, candidates: list[Candidate]) -> Candidate:
    """The candidate whose resulting cluster is best by the CRS criteria (TOPSIS)."""
    rows = []
    for candidate in candidates:
        cpu = np.array(candidate.cpu_shares)
        mem = np.array(candidate.mem_shares)
        rows.append(
            [
                1.0 + math.sqrt(float((cpu * cpu).mean())),
                1.0 + float(cpu.max()),
                1.0 + math.sqrt(float((mem * mem).mean())),
                1.0 + float(mem.max()),
            ]
        )
    scores = topsis(np.array(rows, dtype=np.float64), CRITERIA)
    best = max(range(len(candidates)), key=lambda index: (scores[index], -index))
    return candidates[best]


def rebalance_round(manager: Manager, services: dict[str, ServiceConfig]) -> None:
    """Count rounds above the threshold; past the hold duration, queue the best migration."""
    settings = manager.settings
    usage = manager.usage
    if any(data.state in BUSY_STATES for data in manager.ss.values()):
        manager.rebalance_hold.clear()
        return
    before = _imbalance(usage.cpu, usage.mem, manager)
    if before < settings.auto_rebalance_threshold:
        manager.rebalance_hold.clear()
        return
    rounds = manager.rebalance_hold.get("rounds", 0) + 1
    manager.rebalance_hold["rounds"] = rounds
    if rounds < settings.auto_rebalance_hold:
        return
    candidates = _candidates(manager, services)
    if not candidates:
        return
    if settings.auto_rebalance_method == "topsis":
        best = _topsis_choice(manager, candidates)
    else:
        best = min(candidates, key=lambda c: round(c.after, 9))  # ties: the first in order
    if before - best.after < settings.auto_rebalance_margin:
        return
    after, sid, node = best.after, best.sid, best.node
    manager.env.log(
        "info",
        f"auto rebalance - migrate {sid} to {node} "
        f"(expected change for imbalance from {before:.2f} to {after:.2f})",
    )
    manager.rebalance_hold.clear()
    disarm.handle_commands(manager, [f"migrate {sid} {node}"], services)
