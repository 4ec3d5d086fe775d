"""Node usage for the cluster resource scheduler (CRS): ``basic``, ``static`` and ``dynamic``.

The manager adds every service's usage to the nodes it occupies (its node, and its target while
it moves) and asks for each online node's score for starting a service, lower being better, as
Proxmox's ``PVE::HA::Usage`` does. The scores themselves come from the shared placement code
(``rucher.placement.weighers.crs``), the same functions the scheduler places guests with.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rucher.ha.model import NodeCapacity, ResourceStats
from rucher.placement.weighers.crs import static_scores

MOVING_STATES = frozenset({"migrate", "relocate", "request_start_balance"})
IDLE_STATES = frozenset({"stopped", "request_start"})


def used_nodes(
    online: set[str], state: str, node: str, target: str | None
) -> tuple[str | None, str | None]:
    """The nodes a service in ``state`` counts on: its node, or its target while it moves.

    As in Proxmox's scenarios, a moving service counts on its target only, and one that is only
    requested to start counts nowhere yet.
    """
    if state in IDLE_STATES:
        return None, None
    if state in MOVING_STATES:
        return None, target if target in online else None
    return (node if node in online else None), None


class Usage:
    """Per-node usage of one scheduler mode; scores nodes for starting a service."""

    def __init__(
        self,
        mode: str,
        nodes: list[str],
        capacity: Callable[[str], NodeCapacity],
        stats: Callable[[str], ResourceStats],
    ) -> None:
        """Start with ``nodes`` empty; ``mode`` is ``basic``, ``static`` or ``dynamic``."""
        self.mode = mode
        self.nodes = sorted(nodes)
        self._capacity = {node: capacity(node) for node in self.nodes}
        self._stats = stats
        self.count = dict.fromkeys(self.nodes, 0)
        self.cpu = dict.fromkeys(self.nodes, 0.0)
        self.mem = dict.fromkeys(self.nodes, 0.0)
        self._services: dict[str, list[str]] = {}

    def _demand(self, sid: str) -> tuple[float, float]:
        stats = self._stats(sid)
        if self.mode == "dynamic":
            return stats.cpu, stats.mem
        return stats.maxcpu, stats.maxmem

    def add_service(self, sid: str, state: str, node: str, target: str | None) -> None:
        """Count the service on the nodes it occupies."""
        online = set(self.nodes)
        cpu, mem = self._demand(sid)
        placed = [n for n in used_nodes(online, state, node, target) if n is not None]
        for where in placed:
            self.count[where] += 1
            self.cpu[where] += cpu
            self.mem[where] += mem
        self._services[sid] = placed

    def remove_service(self, sid: str) -> None:
        """Forget the service's usage."""
        cpu, mem = self._demand(sid)
        for where in self._services.pop(sid, []):
            self.count[where] -= 1
            self.cpu[where] -= cpu
            self.mem[where] -= mem

    def scores(self, sid: str) -> dict[str, float]:
        """Each online node's score for starting ``sid`` there (lower is better)."""
        if self.mode == "basic" or not self.nodes:
            return {node: float(self.count[node]) for node in self.nodes}
        caps = [self._capacity[node] for node in self.nodes]
        cpu, mem = self._demand(sid)
        topsis = static_scores(
            np.array([self.cpu[node] for node in self.nodes]),
            np.array([cap.maxcpu for cap in caps]),
            mem=np.array([self.mem[node] for node in self.nodes]),
            maxmem=np.array([cap.maxmem for cap in caps]),
            guest_cpu=cpu,
            guest_mem=mem,
        )
        return {node: -float(score) for node, score in zip(self.nodes, topsis, strict=True)}

    def loads(self) -> dict[str, float]:
        """Each node's load: the larger of its CPU and memory shares."""
        result = {}
        for node in self.nodes:
            cap = self._capacity[node]
            result[node] = max(
                self.cpu[node] / max(cap.maxcpu, 1.0), self.mem[node] / max(cap.maxmem, 1.0)
            )
        return result
