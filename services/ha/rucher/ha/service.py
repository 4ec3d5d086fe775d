"""The HA service of one node: the watchdog's lease, the CRM and the LRM over the live cluster.

Every node runs one. The node watchdog (:mod:`rucher.ha.watchdog`) holds the node's lease and
kills the node's HA guests if it cannot renew it; the CRM campaigns for the manager lease and,
elected, runs the manager's rounds; the LRM carries out the manager's commands for this node's
guests. Both rounds run the pure decision core against :class:`~rucher.ha.live.env.LiveEnv`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from rucher.ha.crm import Crm
from rucher.ha.live.actions import ClusterActions
from rucher.ha.live.cache import ClusterCache, Topic
from rucher.ha.live.env import Bridge, LiveEnv
from rucher.ha.live.rounds import RoundLoop
from rucher.ha.live.settings import LiveSettings
from rucher.ha.lrm import Lrm
from rucher.haconfig import REBOOT_FLAG
from rucher.proto.cluster import NodeCapacity

log = structlog.get_logger("rucher.ha.service")


def reboot_requested(state_dir: Path) -> bool:
    """Whether this stop is a reboot (the flag file is taken, so it counts once)."""
    flag = state_dir / REBOOT_FLAG
    try:
        flag.unlink()
    except FileNotFoundError:
        return False
    return True


class LiveLrm(Lrm):
    """The core's LRM that takes the node's shutdown request at the start of a round."""

    def __init__(self, env: LiveEnv, requested: Callable[[], bool]) -> None:
        super().__init__(env)
        self.requested = requested

    def iterate(self, cluster_state_ok: bool = True) -> bool:
        """Apply the shutdown policy once the node goes down, then run the round."""
        if self.requested() and not self.shutdown_requested:
            self.shutdown_request()
        return super().iterate(cluster_state_ok)


@dataclass(frozen=True)
class HaNodeView:
    """What this node's HA service is doing, for logs and tests."""

    node: str
    epoch: int | None
    crm_state: str
    lrm_state: str
    lrm_mode: str
    rounds: int


class HaService:
    """One node's CRM and LRM loops, fed by the cluster cache."""

    def __init__(
        self,
        *,
        node: str,
        cache: ClusterCache,
        actions: ClusterActions,
        epoch: Callable[[], int | None],
        settings: LiveSettings,
    ) -> None:
        self.node = node
        self.cache = cache
        self.actions = actions
        self.epoch = epoch
        self.settings = settings
        self.capacities: dict[str, NodeCapacity] = {}
        self.stopping = threading.Event()
        self.crm_loop: RoundLoop | None = None
        self.lrm_loop: RoundLoop | None = None
        self.going_down: str | None = None  # "shutdown" or "reboot" once told

    def capacity_published(self, capacity: NodeCapacity) -> None:
        """Remember a node's capacity (the static and dynamic schedulers use it)."""
        self.capacities[capacity.node] = capacity

    def manager_announced(self) -> None:
        """The manager wrote a new state: the LRM reads it now."""
        if self.lrm_loop is not None:
            self.lrm_loop.wake()

    def _env(self, role: str, bridge: Bridge) -> LiveEnv:
        return LiveEnv(
            node=self.node,
            role=role,
            cache=self.cache,
            actions=self.actions,
            bridge=bridge,
            epoch=self.epoch,
            settings=self.settings.cluster,
            capacity=self.capacities.get,
            stopping=self.stopping,
            node_shutdown=lambda: (self.going_down is not None, self.going_down == "reboot"),
        )

    def _changed(self, topic: str, key: str) -> None:
        if self.crm_loop is not None and topic in (Topic.CONFIG, Topic.LRM, Topic.LEASES):
            self.crm_loop.wake()
        if self.lrm_loop is not None and topic in (Topic.MANAGER, Topic.LEASES):
            self.lrm_loop.wake()

    async def start(self) -> None:
        """Start both loops (the cache must be following already)."""
        bridge = Bridge(asyncio.get_running_loop())
        crm_env, lrm_env = self._env("crm", bridge), self._env("lrm", bridge)
        interval, gap = self.settings.round_interval, self.settings.min_gap
        self.crm_loop = RoundLoop("crm", lambda: Crm(crm_env), interval=interval, min_gap=gap)
        self.lrm_loop = RoundLoop(
            "lrm",
            lambda: LiveLrm(lrm_env, lambda: self.going_down is not None),
            interval=interval,
            min_gap=gap,
        )
        self.cache.listeners.append(self._changed)
        self.crm_loop.start()
        self.lrm_loop.start()
        log.info("ha_service_started", node=self.node, interval=interval)

    async def shut_down(self, *, reboot: bool, timeout: float) -> bool:
        """The node goes down: the LRM applies the shutdown policy within ``timeout`` seconds.

        True once the LRM finished (its guests stopped, frozen or moved away, so the node lease
        may be released); False when the time ran out (the watchdog's kill path then applies).
        """
        kind = "reboot" if reboot else "shutdown"
        self.going_down = kind
        loop = self.lrm_loop
        if loop is None:
            return False
        log.info("ha_node_going_down", node=self.node, kind=kind, timeout=timeout)
        loop.wake()
        try:
            async with asyncio.timeout(timeout):
                await loop.finished()
        except TimeoutError:
            log.warning("ha_shutdown_policy_unfinished", node=self.node, kind=kind)
            return False
        log.info("ha_shutdown_policy_applied", node=self.node, kind=kind)
        return True

    async def stop(self) -> None:
        """Stop the loops; the manager lease is given up if held."""
        self.stopping.set()
        for loop in (self.lrm_loop, self.crm_loop):
            if loop is not None:
                await loop.stop()
        if self.actions.manager_lease.token is not None:
            await self.actions.release_manager_lock()

    def view(self) -> HaNodeView:
        """The node's HA state now."""
        crm = self.crm_loop.daemon if self.crm_loop else None
        lrm = self.lrm_loop.daemon if self.lrm_loop else None
        return HaNodeView(
            node=self.node,
            epoch=self.epoch(),
            crm_state=crm.state if crm is not None else "startup",
            lrm_state=lrm.state if lrm is not None else "startup",
            lrm_mode=lrm.mode if isinstance(lrm, Lrm) else "active",
            rounds=(self.crm_loop.rounds if self.crm_loop else 0)
            + (self.lrm_loop.rounds if self.lrm_loop else 0),
        )
