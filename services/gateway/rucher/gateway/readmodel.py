"""The gateway's read model: cluster state kept in memory by watching the cluster store.

Reads (``/nodes``, ``/cluster/resources``, task lists) are answered from here, never by asking
a service. The model follows the ``guests``, ``services`` and ``tasks`` buckets (their current
values, then every change) and the latest node capacity and storage status each node published,
plus every guest run-state change. ``version`` grows with each change, so answers computed from
the model can be cached until it moves.
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
from rucher.proto import compute, container
from rucher.proto.base import Subject
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished, NodeCapacity
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord
from rucher.proto.keys import split_key
from rucher.proto.node import LeaseRecord, ServiceInstance
from rucher.proto.storage import STATUS_PUBLISHED, StorageStatus, StorageStatusPublished
from rucher.proto.streams import EVENTS, GUESTS, SERVICES, TASKS
from rucher.proto.task import TaskState

log = structlog.get_logger("rucher.gateway.readmodel")

T = TypeVar("T", bound=msgspec.Struct)
E = TypeVar("E", bound=msgspec.Struct)

START_PATIENCE = 30.0


class ReadModel:
    """Guests, registrations, tasks, capacity and storage of the whole cluster, in memory."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.version = 0
        self.guests: dict[int, GuestRecord] = {}
        self.guest_state: dict[int, PowerState] = {}
        self.instances: dict[str, ServiceInstance] = {}
        self.tasks: dict[str, TaskState] = {}
        self.capacity: dict[str, NodeCapacity] = {}
        self.storages: dict[str, tuple[StorageStatus, ...]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._subscriptions: list[Subscription] = []
        self._waiting: list[asyncio.Event] = []

    # Queries --------------------------------------------------------------------------------

    def nodes(self) -> dict[str, bool]:
        """Every node the cluster knows, sorted, with whether it is online (a live registration)."""
        online = {instance.node for instance in self.instances.values()}
        known = online | self.capacity.keys() | {guest.node for guest in self.guests.values()}
        return {node: node in online for node in sorted(known)}

    def node_address(self, node: str) -> str:
        """The address a node's services registered with, if any did."""
        return next(
            (i.address for i in self.instances.values() if i.node == node and i.address), ""
        )

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following the store and return once the current state is loaded."""
        self._follow_bucket(KV(self.bus, GUESTS, GuestRecord), self._on_guest)
        self._follow_bucket(KV(self.bus, SERVICES, LeaseRecord), self._on_registration)
        self._follow_bucket(KV(self.bus, TASKS, TaskState), self._on_task)
        await self._follow_events(
            NODE_CAPACITY_PUBLISHED, api.DeliverPolicy.LAST_PER_SUBJECT, self._on_capacity
        )
        await self._follow_events(
            STATUS_PUBLISHED, api.DeliverPolicy.LAST_PER_SUBJECT, self._on_storage
        )
        # Run states are per guest but their subjects are per node: replay them all.
        await self._follow_events(
            compute.GUEST_STATE_CHANGED, api.DeliverPolicy.ALL, self._on_state_change
        )
        await self._follow_events(
            container.GUEST_STATE_CHANGED, api.DeliverPolicy.ALL, self._on_state_change
        )
        try:
            async with asyncio.timeout(START_PATIENCE):
                await asyncio.gather(*(event.wait() for event in self._waiting))
        except TimeoutError as err:
            raise RucherError(ErrorCode.UNAVAILABLE, "the cluster store did not load") from err

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

    def _changed(self) -> None:
        self.version += 1

    # Buckets --------------------------------------------------------------------------------

    def _follow_bucket(self, kv: KV[T], apply: Callable[[Entry[T]], None]) -> None:
        loaded = asyncio.Event()
        self._waiting.append(loaded)

        async def follow() -> None:
            async with kv.watch() as updates:
                async for entry in updates:
                    if entry is None:
                        loaded.set()
                        continue
                    apply(entry)
                    self._changed()

        self._loops.append(asyncio.create_task(follow(), name=f"readmodel-{kv.bucket.name}"))

    def _on_guest(self, entry: Entry[GuestRecord]) -> None:
        vmid = int(entry.key)
        if entry.operation is Operation.PUT and entry.value is not None:
            self.guests[vmid] = entry.value
        else:
            self.guests.pop(vmid, None)
            self.guest_state.pop(vmid, None)

    def _on_registration(self, entry: Entry[LeaseRecord]) -> None:
        if entry.operation is Operation.PUT and entry.value is not None:
            try:
                self.instances[entry.key] = decode(entry.value.info, ServiceInstance)
            except RucherError:
                log.warning("registration_unreadable", key=entry.key)
        else:
            self.instances.pop(entry.key, None)

    def _on_task(self, entry: Entry[TaskState]) -> None:
        if entry.operation is Operation.PUT and entry.value is not None:
            self.tasks[entry.value.upid] = entry.value
        else:
            self.tasks.pop(split_key(entry.key)[-1], None)

    # Events ---------------------------------------------------------------------------------

    async def _follow_events(
        self, subject: Subject[E], policy: api.DeliverPolicy, apply: Callable[[E], None]
    ) -> None:
        loaded = asyncio.Event()
        self._waiting.append(loaded)

        async def on_message(msg: Msg) -> None:
            try:
                apply(decode(msg.data, subject.payload))
                self._changed()
            except RucherError:
                log.warning("event_unreadable", subject=msg.subject)
            if msg.metadata.num_pending == 0:
                loaded.set()

        subscription = await self.bus.js.subscribe(
            subject.wildcard(),
            stream=EVENTS.name,
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=policy,
            inactive_threshold=300.0,
        )
        self._subscriptions.append(subscription)
        info = await subscription.consumer_info()
        if info.num_pending == 0:
            loaded.set()

    def _on_capacity(self, event: CapacityPublished) -> None:
        self.capacity[event.capacity.node] = event.capacity

    def _on_storage(self, event: StorageStatusPublished) -> None:
        self.storages[event.node] = event.storages

    def _on_state_change(self, event: compute.VmStateChanged | container.CtStateChanged) -> None:
        self.guest_state[event.vmid] = event.state
