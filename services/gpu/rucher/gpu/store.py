"""The broker's cluster-store adapters: leases and mappings in KV, guests, events on the bus.

Buckets (``rucher.proto.streams``): ``gpu_leases`` holds ``{node}.{lease id}`` -> GpuLease,
written only by that node's broker; ``mappings`` holds ``pci.{mapping id}`` -> PciMapping.
"""

from __future__ import annotations

import hashlib
import time
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog

from rucher.bus import KV, Bus, RucherError
from rucher.bus.client import new_id
from rucher.proto.base import Address
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import (
    DEVICE_ALLOCATED,
    DEVICE_RELEASED,
    INVENTORY_PUBLISHED,
    DeviceAllocated,
    DeviceReleased,
    GpuInventory,
    GpuLease,
    InventoryPublished,
    PciMapping,
    PciMappingState,
    ReleaseReason,
)
from rucher.proto.guest import GuestRecord
from rucher.proto.keys import decode_token, make_key, split_key
from rucher.proto.streams import GPU_LEASES, GUESTS, MAPPINGS

log = structlog.get_logger("rucher.gpu.store")

MAPPING_KIND = "pci"
E = TypeVar("E", bound=msgspec.Struct)


def mapping_key(mapping_id: str) -> str:
    """The ``mappings`` bucket key of a PCI mapping."""
    return make_key(MAPPING_KIND, mapping_id)


def mapping_digest(mapping: PciMapping) -> str:
    """A mapping's digest: SHA-1 of its canonical JSON form."""
    return hashlib.sha1(msgspec.json.encode(mapping), usedforsecurity=False).hexdigest()


class KvLeaseStore:
    """This node's leases in the ``gpu_leases`` bucket."""

    def __init__(self, bus: Bus, node: str) -> None:
        self.kv: KV[GpuLease] = KV(bus, GPU_LEASES, GpuLease)
        self.node = node

    async def load(self) -> list[GpuLease]:
        """Every lease recorded for this node."""
        entries = await self.kv.entries(f"{make_key(self.node)}.>")
        return [entry.value for entry in entries if entry.value is not None]

    async def record(self, lease: GpuLease) -> None:
        """Record a lease."""
        await self.kv.put(make_key(self.node, lease.lease_id), lease)

    async def remove(self, lease_id: str) -> None:
        """Forget a lease."""
        await self.kv.delete(make_key(self.node, lease_id))


class MemoryLeaseStore:
    """Leases kept in memory: for tests and the benchmark, and what survives a fake restart."""

    def __init__(self) -> None:
        self.leases: dict[str, GpuLease] = {}

    async def load(self) -> list[GpuLease]:
        """Every lease."""
        return list(self.leases.values())

    async def record(self, lease: GpuLease) -> None:
        """Record a lease."""
        self.leases[lease.lease_id] = lease

    async def remove(self, lease_id: str) -> None:
        """Forget a lease."""
        self.leases.pop(lease_id, None)


class KvMappings:
    """The PCI mappings in the ``mappings`` bucket, read and written by compare-and-set."""

    def __init__(self, bus: Bus) -> None:
        self.kv: KV[PciMapping] = KV(bus, MAPPINGS, PciMapping)

    async def mapping(self, mapping_id: str) -> PciMapping | None:
        """The mapping named ``mapping_id``, or None."""
        entry = await self.kv.get(mapping_key(mapping_id))
        return entry.value if entry is not None else None

    async def all(self) -> list[PciMapping]:
        """Every mapping, sorted by id."""
        entries = await self.kv.entries(f"{MAPPING_KIND}.>")
        return sorted(
            (entry.value for entry in entries if entry.value is not None), key=lambda m: m.id
        )

    async def states(self, mapping_id: str | None = None) -> list[PciMappingState]:
        """Mappings with their digests."""
        found = await self.all() if mapping_id is None else []
        if mapping_id is not None and (one := await self.mapping(mapping_id)) is not None:
            found = [one]
        return [PciMappingState(mapping=m, digest=mapping_digest(m)) for m in found]

    async def create(self, mapping: PciMapping) -> None:
        """Store a new mapping; ``exists`` if the id is taken."""
        try:
            await self.kv.create(mapping_key(mapping.id), mapping)
        except RucherError as err:
            if err.code is ErrorCode.CONFLICT:
                raise RucherError(
                    ErrorCode.EXISTS,
                    f"PCI mapping '{mapping.id}' already exists",
                    details={"field": "id"},
                ) from err
            raise

    async def replace(self, mapping: PciMapping, digest: str | None) -> None:
        """Replace a mapping that still has ``digest`` (any digest when None)."""
        entry = await self.kv.get(mapping_key(mapping.id))
        if entry is None or entry.value is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"PCI mapping '{mapping.id}' does not exist")
        if digest is not None and digest != mapping_digest(entry.value):
            raise RucherError(
                ErrorCode.CONFLICT,
                "detected modified configuration - file changed by other user? Try again.",
                details={"field": "digest"},
            )
        await self.kv.update(mapping_key(mapping.id), mapping, revision=entry.revision)

    async def delete(self, mapping_id: str) -> None:
        """Remove a mapping; ``not_found`` if there is none."""
        if await self.mapping(mapping_id) is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"PCI mapping '{mapping_id}' does not exist")
        await self.kv.delete(mapping_key(mapping_id))


class KvGuestDirectory:
    """Which guests the ``guests`` bucket places on this node."""

    def __init__(self, bus: Bus, node: str) -> None:
        self.kv: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)
        self.node = node

    async def on_node(self) -> set[int]:
        """The VMIDs whose record names this node."""
        entries = await self.kv.entries()
        return {
            int(decode_token(split_key(entry.key)[0]))
            for entry in entries
            if entry.value is not None and entry.value.node == self.node
        }


class BusEvents:
    """The broker's events, published at once (an allocation's caller reads the inventory)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def _publish(self, address: Address[E], event: E) -> None:
        try:
            await self.bus.publish(address, event)
        except (RucherError, nats.errors.Error, nats.js.errors.Error) as err:
            log.warning("event_not_published", subject=address.subject, error=repr(err))

    async def inventory(self, inventory: GpuInventory) -> None:
        """Publish the node's inventory."""
        event = InventoryPublished(
            event_id=new_id(), node=self.bus.node, time=time.time(), inventory=inventory
        )
        address = INVENTORY_PUBLISHED.to(node=self.bus.node)
        await self._publish(address, event)

    async def allocated(self, lease: GpuLease) -> None:
        """Publish that a lease was made."""
        event = DeviceAllocated(
            event_id=new_id(), node=self.bus.node, time=time.time(), lease=lease
        )
        address = DEVICE_ALLOCATED.to(node=self.bus.node)
        await self._publish(address, event)

    async def released(self, lease: GpuLease, reason: ReleaseReason) -> None:
        """Publish that a lease ended."""
        event = DeviceReleased(
            event_id=new_id(),
            node=self.bus.node,
            time=time.time(),
            lease_id=lease.lease_id,
            vmid=lease.vmid,
            kind=lease.kind,
            address=lease.address,
            reason=reason,
        )
        address = DEVICE_RELEASED.to(node=self.bus.node)
        await self._publish(address, event)
