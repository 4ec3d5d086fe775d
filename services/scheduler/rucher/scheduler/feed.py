"""Keep the scheduler's view current: the cluster store's buckets and the agents' last events.

At start the whole state is loaded (current values of the buckets, the last event of each
node) before the scheduler answers anything; afterwards every change is applied as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from rucher.bus import KV, Bus, Entry, Operation, RucherError
from rucher.bus.codec import decode
from rucher.claims import guest_reservation
from rucher.placement import ClusterView
from rucher.proto.base import Subject
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import INVENTORY_PUBLISHED, InventoryPublished, PciMapping
from rucher.proto.guest import GuestRecord
from rucher.proto.ha import MANAGER_STATUS_PUBLISHED, ManagerStatusPublished, NodeState
from rucher.proto.keys import decode_token, split_key
from rucher.proto.node import LeaseRecord
from rucher.proto.scheduler import NodeAllocations
from rucher.proto.storage import STATUS_PUBLISHED, StorageStatusPublished
from rucher.proto.streams import ALLOCATIONS, EVENTS, GUESTS, MAPPINGS, SERVICES
from rucher.scheduler.service import SchedulerService

log = structlog.get_logger("rucher.scheduler.feed")

T = TypeVar("T", bound=msgspec.Struct)
LOAD_PATIENCE = 30.0
# The ``mappings`` bucket's key prefix of PCI resource mappings (``pci.{id}``).
PCI_MAPPINGS = "pci"
# Manager states in which a node takes no new guests.
CLOSED = frozenset({NodeState.MAINTENANCE, NodeState.FENCE, NodeState.UNKNOWN, NodeState.GONE})


class ClusterFeed:
    """Follows what the scheduler's view and ledger are derived from."""

    def __init__(
        self,
        bus: Bus,
        service: SchedulerService,
        *,
        agents: frozenset[str],
        on_guest: Callable[[int, str | None], None] | None = None,
    ) -> None:
        self.bus = bus
        self.service = service
        self.view: ClusterView = service.view
        self.agents = agents
        self.on_guest = on_guest
        self.registrations: dict[str, str] = {}  # registry key -> node
        self.agents_on: dict[str, int] = {}  # node -> agents registered there
        self.guest_nodes: dict[int, str] = {}
        self.closed: set[str] = set()
        self.mappings: dict[str, PciMapping] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._subscriptions: list[Subscription] = []
        self._loaded: list[asyncio.Event] = []

    async def start(self) -> None:
        """Load the current state of every source, then keep following them."""
        self._follow(KV(self.bus, SERVICES, LeaseRecord), self._on_registration)
        self._follow(KV(self.bus, ALLOCATIONS, NodeAllocations), self._on_allocations)
        self._follow(KV(self.bus, GUESTS, GuestRecord), self._on_guest)
        self._follow(KV(self.bus, MAPPINGS, PciMapping), self._on_mapping)
        await self._events(NODE_CAPACITY_PUBLISHED, self._on_capacity)
        await self._events(STATUS_PUBLISHED, self._on_storage)
        await self._events(INVENTORY_PUBLISHED, self._on_inventory)
        await self._events(MANAGER_STATUS_PUBLISHED, self._on_manager)
        try:
            async with asyncio.timeout(LOAD_PATIENCE):
                await asyncio.gather(*(loaded.wait() for loaded in self._loaded))
        except TimeoutError as err:
            raise RucherError(ErrorCode.UNAVAILABLE, "the cluster store did not load") from err
        log.info("view_loaded", nodes=self.view.present_count(), guests=len(self.view.locations))

    async def stop(self) -> None:
        """Stop following."""
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        for subscription in self._subscriptions:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await subscription.unsubscribe()

    # Sources --------------------------------------------------------------------------------

    def _follow(self, kv: KV[T], apply: Callable[[Entry[T]], None]) -> None:
        loaded = asyncio.Event()
        self._loaded.append(loaded)

        async def follow() -> None:
            async with kv.watch() as updates:
                async for entry in updates:
                    if entry is None:
                        loaded.set()
                        continue
                    apply(entry)

        self._loops.append(asyncio.create_task(follow(), name=f"feed-{kv.bucket.name}"))

    async def _events(self, subject: Subject[T], apply: Callable[[T], None]) -> None:
        loaded = asyncio.Event()
        self._loaded.append(loaded)

        async def on_message(msg: Msg) -> None:
            try:
                apply(decode(msg.data, subject.payload))
            except RucherError:
                log.warning("event_unreadable", subject=msg.subject)
            if msg.metadata.num_pending == 0:
                loaded.set()

        subscription = await self.bus.js.subscribe(
            subject.wildcard(),
            stream=EVENTS.name,
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=300.0,
        )
        self._subscriptions.append(subscription)
        info = await subscription.consumer_info()
        if info.num_pending == 0:
            loaded.set()

    # Applying -------------------------------------------------------------------------------

    def _on_registration(self, entry: Entry[LeaseRecord]) -> None:
        parts = split_key(entry.key)
        if len(parts) != 3 or parts[0] not in self.agents:
            return
        node = parts[1]
        if entry.operation is Operation.PUT:
            if entry.key not in self.registrations:
                self.registrations[entry.key] = node
                self.agents_on[node] = self.agents_on.get(node, 0) + 1
        elif self.registrations.pop(entry.key, None) is not None:
            self.agents_on[node] -= 1
        self.view.set_online(node, self.agents_on.get(node, 0) > 0)

    def _on_allocations(self, entry: Entry[NodeAllocations]) -> None:
        node = decode_token(entry.key)
        value = entry.value if entry.operation is Operation.PUT else None
        self.service.observe_allocations(node, value, entry.revision)

    def _on_guest(self, entry: Entry[GuestRecord]) -> None:
        vmid = int(entry.key)
        record = entry.value if entry.operation is Operation.PUT else None
        previous = self.guest_nodes.pop(vmid, None)
        if previous is not None:
            self.service.ledger.set_guest(previous, None, vmid)
        if record is not None:
            self.guest_nodes[vmid] = record.node
            guest = guest_reservation(vmid, record.type, record.config)
            self.service.ledger.set_guest(record.node, guest, vmid)
        if self.on_guest is not None and previous != (record.node if record else None):
            self.on_guest(vmid, record.node if record else None)

    def _on_mapping(self, entry: Entry[PciMapping]) -> None:
        parts = split_key(entry.key)
        if len(parts) != 2 or parts[0] != PCI_MAPPINGS:
            return
        if entry.operation is Operation.PUT and entry.value is not None:
            self.mappings[parts[1]] = entry.value
        elif self.mappings.pop(parts[1], None) is None:
            return
        self.view.set_mappings(self.mappings.values())

    def _on_capacity(self, event: CapacityPublished) -> None:
        self.view.set_capacity(event.capacity)

    def _on_storage(self, event: StorageStatusPublished) -> None:
        self.view.set_storages(event.node, event.storages)

    def _on_inventory(self, event: InventoryPublished) -> None:
        self.view.set_gpu_inventory(event.inventory)
        self.service.ledger.set_applied(event.inventory.node, event.inventory.claims)

    def _on_manager(self, event: ManagerStatusPublished) -> None:
        closed = {n for n, state in event.status.node_status.items() if state in CLOSED}
        for node in closed ^ self.closed:
            self.view.set_maintenance(node, node in closed)
        self.closed = closed
