"""What the HA service knows of the cluster store, followed by KV watches into memory.

The manager and the LRMs read the ``ha`` bucket (configuration, the manager's state, every
node's LRM status, queued requests), each member node's ``ha-node-{node}`` bucket (whether the
node holds its HA lease, and under which fencing token), the ``leases`` bucket (the manager
lease) and the ``guests`` bucket (which node owns each guest) every round;
following them with watches makes each read a dictionary lookup and turns every change into a
wake-up for the round that cares (an LRM result wakes the manager, a new manager state wakes the
LRMs, an expired node lease wakes the manager at once).

Safety never rests on this cache being current: a fence is a compare-and-set on the lease, a
start is checked by the agent against the lease's current token and the registry's owner.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec
import structlog

from rucher.bus import KV, Bus, Operation, RucherError
from rucher.haconfig import CONTROL, GROUPS, RESOURCES, RULES
from rucher.leases import node_lease_key
from rucher.proto.guest import GuestRecord
from rucher.proto.ha import (
    CrmRequest,
    HaControl,
    HaGroups,
    HaLrmStatus,
    HaManagerState,
    HaResources,
    HaRules,
)
from rucher.proto.keys import decode_token, make_key
from rucher.proto.node import LeaseRecord
from rucher.proto.streams import GUESTS, HA, LEASES, BucketDef, node_lease_bucket

log = structlog.get_logger("rucher.ha.live.cache")

T = TypeVar("T", bound=msgspec.Struct)
MANAGER_STATE = "manager_state"
LRM_PREFIX = "lrm"
COMMAND_PREFIX = "command"
RESUBSCRIBE = 0.5


def lrm_key(node: str) -> str:
    """The key of ``node``'s LRM status in the ``ha`` bucket."""
    return make_key(LRM_PREFIX, node)


def node_holder(node: str) -> str:
    """The holder name under which ``node``'s own watchdog holds the node's HA lease."""
    return f"{node}/ha"


class Topic:
    """What changed, for the rounds that wait on it."""

    CONFIG = "config"  # resources, rules, groups, control, requests, guests
    MANAGER = "manager"  # the manager's state
    LRM = "lrm"  # an LRM's status
    LEASES = "leases"  # a node's lease or the manager lease


@dataclass
class Follower(Generic[T]):
    """One watch over ``pattern`` of a bucket, kept as key → value (removals drop the key)."""

    bus: Bus
    bucket: BucketDef
    kind: type[T]
    pattern: str
    topic: str
    values: dict[str, T] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, changed: Callable[[str, str], None]) -> None:
        """Follow forever, re-subscribing after an error (the last values are kept meanwhile)."""
        kv: KV[T] = KV(self.bus, self.bucket, self.kind)
        while True:
            try:
                async with kv.watch(self.pattern) as updates:
                    fresh: dict[str, T] = {}
                    caught_up = False
                    async for entry in updates:
                        if entry is None:
                            self.values = fresh
                            caught_up = True
                            self.ready.set()
                            changed(self.topic, "")
                            continue
                        target = self.values if caught_up else fresh
                        if entry.operation is Operation.PUT and entry.value is not None:
                            target[entry.key] = entry.value
                        else:
                            target.pop(entry.key, None)
                        if caught_up:
                            changed(self.topic, entry.key)
            except RucherError as err:
                log.warning("ha_watch_failed", bucket=self.bucket.name, error=err.message)
            await asyncio.sleep(RESUBSCRIBE)


class ClusterCache:
    """Every document the HA rounds read, followed in the background."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.resources_f = Follower(bus, HA, HaResources, RESOURCES, Topic.CONFIG)
        self.rules_f = Follower(bus, HA, HaRules, RULES, Topic.CONFIG)
        self.groups_f = Follower(bus, HA, HaGroups, GROUPS, Topic.CONFIG)
        self.control_f = Follower(bus, HA, HaControl, CONTROL, Topic.CONFIG)
        self.requests_f = Follower(bus, HA, CrmRequest, f"{COMMAND_PREFIX}.*", Topic.CONFIG)
        self.manager_f = Follower(bus, HA, HaManagerState, MANAGER_STATE, Topic.MANAGER)
        self.lrm_f = Follower(bus, HA, HaLrmStatus, f"{LRM_PREFIX}.*", Topic.LRM)
        self.leases_f = Follower(bus, LEASES, LeaseRecord, ">", Topic.LEASES)
        self.guests_f = Follower(bus, GUESTS, GuestRecord, ">", Topic.CONFIG)
        self.followers: list[Follower[msgspec.Struct]] = [
            self.resources_f,  # type: ignore[list-item]
            self.rules_f,  # type: ignore[list-item]
            self.groups_f,  # type: ignore[list-item]
            self.control_f,  # type: ignore[list-item]
            self.requests_f,  # type: ignore[list-item]
            self.manager_f,  # type: ignore[list-item]
            self.lrm_f,  # type: ignore[list-item]
            self.leases_f,  # type: ignore[list-item]
            self.guests_f,  # type: ignore[list-item]
        ]
        # One per member node, over the node's own lease bucket (members appear over time).
        self.node_lease_fs: dict[str, Follower[LeaseRecord]] = {}
        self.listeners: list[Callable[[str, str], None]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _changed(self, topic: str, key: str) -> None:
        if topic in (Topic.LRM, Topic.MANAGER):
            self._follow_members()
        for listener in self.listeners:
            listener(topic, key)

    def _follow_members(self) -> None:
        """Follow the lease of every node known as a member and not followed yet."""
        members = self.lrm_nodes() | {self.bus.node}
        state = self.manager_state()
        if state is not None:
            members |= set(state.node_status)
        for node in sorted(members - set(self.node_lease_fs)):
            bucket = node_lease_bucket(node)
            follower = Follower(self.bus, bucket, LeaseRecord, ">", Topic.LEASES)
            self.node_lease_fs[node] = follower
            self._tasks.append(
                asyncio.create_task(follower.run(self._changed), name=f"ha-follow-lease-{node}")
            )

    async def start(self, timeout: float = 30.0) -> None:
        """Start following, and wait until every watch has caught up once."""
        self._tasks = [
            asyncio.create_task(f.run(self._changed), name=f"ha-follow-{f.pattern}")
            for f in self.followers
        ]
        async with asyncio.timeout(timeout):
            for follower in self.followers:
                await follower.ready.wait()
        self._follow_members()

    async def stop(self) -> None:
        """Stop following."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # --- reads (plain lookups, safe from the rounds' threads) -------------------------------

    def resources(self) -> HaResources:
        """The ``resources`` document."""
        return self.resources_f.values.get(RESOURCES) or HaResources()

    def rules(self) -> HaRules:
        """The ``rules`` document."""
        return self.rules_f.values.get(RULES) or HaRules()

    def groups(self) -> HaGroups:
        """The ``groups`` document."""
        return self.groups_f.values.get(GROUPS) or HaGroups()

    def control(self) -> HaControl:
        """The ``control`` document."""
        return self.control_f.values.get(CONTROL) or HaControl()

    def requests(self) -> list[CrmRequest]:
        """Queued migrate/relocate requests, oldest first."""
        return sorted(self.requests_f.values.values(), key=lambda request: request.time)

    def manager_state(self) -> HaManagerState | None:
        """The manager's last written state."""
        return self.manager_f.values.get(MANAGER_STATE)

    def lrm_status(self, node: str) -> HaLrmStatus | None:
        """``node``'s last written LRM status."""
        return self.lrm_f.values.get(lrm_key(node))

    def lrm_nodes(self) -> set[str]:
        """Every node that ever wrote an LRM status."""
        return {decode_token(key.split(".", 1)[1]) for key in list(self.lrm_f.values)}

    def node_leases(self) -> dict[str, LeaseRecord]:
        """Each followed node's HA lease record as stored now, by node name."""
        found: dict[str, LeaseRecord] = {}
        for node, follower in list(self.node_lease_fs.items()):
            record = follower.values.get(node_lease_key(node))
            if record is not None:
                found[node] = record
        return found

    def online_nodes(self) -> dict[str, int]:
        """Nodes whose own watchdog holds their lease now, with its fencing token."""
        return {
            node: record.token
            for node, record in self.node_leases().items()
            if record.holder == node_holder(node) and record.token > 0
        }

    def guests(self) -> dict[int, GuestRecord]:
        """Every guest by VMID."""
        return {record.vmid: record for record in list(self.guests_f.values.values())}

    def guest(self, vmid: int) -> GuestRecord | None:
        """One guest's record."""
        return self.guests_f.values.get(str(vmid))
