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
from typing import TYPE_CHECKING

import numpy as np

from rucher.ha import disarm
from rucher.ha.model import ServiceConfig
from rucher.ha.rules import get_node_affinity, get_resource_affinity, is_allowed_on_node
from rucher.placement.rebalance import imbalance

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
    online = set(usage.nodes)
    best: tuple[float, str, str] | None = None
    for sid in sorted(manager.ss):
        data = manager.ss[sid]
        config = services.get(sid)
        if config is None or data.state != "started" or data.node not in online:
            continue
        allowed, _ = get_node_affinity(manager.rules, sid, online)
        stats = manager.env.resource_stats(sid)
        demand = (stats.cpu, stats.mem) if usage.mode == "dynamic" else (stats.maxcpu, stats.maxmem)
        for node in sorted(allowed - {data.node}):
            together, separate = get_resource_affinity(manager.rules, sid, manager.ss, online)
            if not is_allowed_on_node(together, separate, node):
                continue
            cpu, mem = dict(usage.cpu), dict(usage.mem)
            cpu[data.node] -= demand[0]
            mem[data.node] -= demand[1]
            cpu[node] += demand[0]
            mem[node] += demand[1]
            after = _imbalance(cpu, mem, manager)
            if best is None or after < best[0] - 1e-12:
                best = (after, sid, node)
    if best is None or before - best[0] < settings.auto_rebalance_margin:
        return
    after, sid, node = best
    manager.env.log(
        "info",
        f"auto rebalance - migrate {sid} to {node} "
        f"(expected change for imbalance from {before:.2f} to {after:.2f})",
    )
    manager.rebalance_hold.clear()
    disarm.handle_commands(manager, [f"migrate {sid} {node}"], services)
