"""The node part's live wiring: the node lease, the HA guest set it guards, the self-fence event.

:class:`HaGuestSet` follows the ``resources`` document of the ``ha`` bucket and keeps the VMIDs of
the ``vm:`` resources in memory and in a state file, so the watchdog knows what to kill when the
bus is gone, even right after a restart. :func:`start_node_watchdog` builds the
:class:`~rucher.ha.watchdog.NodeWatchdog` for this node over ``rucher.leases``, with the lease's
bucket led from this node's NATS server (:class:`LocalLeader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import structlog

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.bus.provision import lead_here
from rucher.ha.config import WatchdogSettings
from rucher.ha.killer import kill_ha_guests
from rucher.ha.watchdog import GuardLink, NodeWatchdog
from rucher.haconfig import RESOURCES, HaConfigStore
from rucher.leases import Lease, ensure_node_lease_bucket, node_lease_name
from rucher.proto.ha import NODE_SELF_FENCED, HaResources, SelfFenced

log = structlog.get_logger("rucher.ha.lease")

RESUBSCRIBE = 1.0
EVENT_PATIENCE = 600.0
LEADER_CHECK = 5.0
FIRST_PLACEMENT = 5.0


def vm_ids(resources: HaResources) -> frozenset[int]:
    """The VMIDs of the ``vm:`` resources (containers are not libvirt domains)."""
    return frozenset(int(sid[3:]) for sid in resources.resources if sid.startswith("vm:"))


class HaGuestSet:
    """The HA VMIDs, followed from the cluster store and remembered in ``path``."""

    def __init__(self, bus: Bus, path: Path) -> None:
        self.store = HaConfigStore(bus)
        self.path = path
        self.vmids: frozenset[int] = self._load()
        self._task: asyncio.Task[None] | None = None

    def _load(self) -> frozenset[int]:
        try:
            return frozenset(int(v) for v in json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return frozenset()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(sorted(self.vmids)))
        partial.replace(self.path)

    def update(self, vmids: frozenset[int]) -> None:
        """Take a new set (and remember it)."""
        if vmids != self.vmids:
            log.info("ha_guest_set", vmids=sorted(vmids))
            self.vmids = vmids
            self._save()

    def __call__(self) -> frozenset[int]:
        """The current set."""
        return self.vmids

    async def start(self) -> None:
        """Read the set once, then follow every change in the background."""
        self.update(vm_ids((await self.store.resources()).value))
        self._task = asyncio.create_task(self._follow(), name="ha-guest-set")

    async def _follow(self) -> None:
        while True:
            try:
                async with self.store.resources_kv.watch(RESOURCES) as updates:
                    async for entry in updates:
                        if entry is None:
                            continue
                        self.update(vm_ids(entry.value) if entry.value else frozenset())
            except RucherError as err:
                # The bus is away: keep the last known set (that is what it is for).
                log.warning("ha_guest_set_watch_failed", error=err.message)
            await asyncio.sleep(RESUBSCRIBE)

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class LocalLeader:
    """Keep the node lease bucket's Raft leader on this node's own NATS server.

    A write needs the stream's leader. Led from here, the lease stays renewable while any other
    server is lost, and this node alone stops renewing when its own server loses the cluster,
    which is when it must. Led from elsewhere, losing that server would stall the renewals for
    a Raft election (4-9 s) and fence a healthy node. Leadership may move on its own (an
    election after a pause): it is checked every ``every`` seconds and moved back.
    """

    def __init__(self, bus: Bus, every: float = LEADER_CHECK) -> None:
        self.bus = bus
        self.every = every
        self.stream = ""
        self._task: asyncio.Task[None] | None = None

    async def place(self) -> str:
        """Create the bucket if needed and lead it from here; returns the leader's name."""
        if not self.stream:
            self.stream = f"KV_{(await ensure_node_lease_bucket(self.bus, self.bus.node)).name}"
        return await lead_here(self.bus, self.stream)

    async def start(self) -> None:
        """Place the leader once (briefly), then keep it placed in the background."""
        try:
            async with asyncio.timeout(FIRST_PLACEMENT):
                await self.place()
        except (RucherError, TimeoutError) as err:
            log.warning("ha_lease_leader_not_placed", error=str(err))
        self._task = asyncio.create_task(self._keep(), name="ha-lease-leader")

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.place()
            except RucherError as err:
                log.warning("ha_lease_leader_not_placed", error=err.message)

    async def stop(self) -> None:
        """Stop keeping it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def publish_self_fenced(bus: Bus, vmids: list[int], token: int, deadline: float) -> None:
    """Say on the bus that this node killed its HA guests, once the bus answers again."""
    event = SelfFenced(
        event_id=new_id(),
        node=bus.node,
        time=time.time(),
        sids=tuple(f"vm:{vmid}" for vmid in vmids),
        lease_token=token,
        deadline=deadline,
    )
    give_up = time.monotonic() + EVENT_PATIENCE
    while time.monotonic() < give_up:
        try:
            await bus.publish(NODE_SELF_FENCED.to(node=bus.node), event)
        except RucherError as err:
            log.warning("self_fenced_not_published", error=err.message)
            await asyncio.sleep(RESUBSCRIBE)
        else:
            return


async def start_node_watchdog(
    bus: Bus, settings: WatchdogSettings, *, holder: str, state_dir: Path
) -> tuple[NodeWatchdog, HaGuestSet, LocalLeader]:
    """Follow the HA guest set, then hold this node's lease (led from here) under the watchdog."""
    leader = LocalLeader(bus)
    await leader.start()
    guests = HaGuestSet(bus, state_dir / "ha-guests.json")
    try:
        await guests.start()
    except RucherError as err:
        # Start without the bus: the remembered set lets the start-up sweep still work.
        log.warning("ha_guest_set_unavailable", error=err.message)
    lease = Lease.named(bus, node_lease_name(bus.node), holder=holder, ttl=settings.lease_ttl)

    async def kill(vmids: frozenset[int]) -> tuple[list[int], bool]:
        return await kill_ha_guests(
            vmids, uri=settings.libvirt_uri, destroy_timeout=settings.destroy_timeout
        )

    async def fenced(vmids: list[int], token: int, deadline: float) -> None:
        await publish_self_fenced(bus, vmids, token, deadline)

    watchdog = NodeWatchdog(
        lease, guests, kill, settings, guard=GuardLink(settings), on_fenced=fenced
    )
    await watchdog.start()
    return watchdog, guests, leader
