"""Cluster-wide PCI mappings (``/cluster/mapping/pci``): checked against the nodes, then stored.

Any broker instance answers. Before a mapping is stored, every entry is checked against its
node's devices as that node's broker lists them now: a path the node lacks, or a device whose
vendor and device ids differ from the entry's, refuses the whole mapping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from rucher.bus import RucherError
from rucher.gpu.store import KvMappings
from rucher.proto.common import Done
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import (
    MappingCreate,
    MappingDelete,
    MappingListing,
    MappingListQuery,
    MappingUpdate,
    PciDevice,
    PciMapping,
)

DeviceLister = Callable[[str], Awaitable[list[PciDevice]]]


class Mappings:
    """Create, change, delete and list PCI mappings."""

    def __init__(self, book: KvMappings, devices_of: DeviceLister) -> None:
        self.book = book
        self.devices_of = devices_of

    async def check(self, mapping: PciMapping) -> None:
        """Refuse a mapping naming a device its node does not have (nothing is stored)."""
        listed: dict[str, dict[str, PciDevice]] = {}
        seen: set[str] = set()
        for entry in mapping.map:
            if entry.node in seen:
                raise RucherError(
                    ErrorCode.INVALID,
                    f"node '{entry.node}' is mapped twice",
                    details={"field": "map"},
                )
            seen.add(entry.node)
            if entry.node not in listed:
                try:
                    devices = await self.devices_of(entry.node)
                except RucherError as err:
                    raise RucherError(
                        ErrorCode.INVALID,
                        f"node '{entry.node}' cannot list its PCI devices: {err.message}",
                        details={"field": "map"},
                    ) from err
                listed[entry.node] = {device.address: device for device in devices}
            device = listed[entry.node].get(entry.path)
            if device is None:
                raise RucherError(
                    ErrorCode.INVALID,
                    f"node '{entry.node}' has no PCI device {entry.path}",
                    details={"field": "map"},
                )
            if (device.vendor_id, device.device_id) != (entry.vendor_id, entry.device_id):
                raise RucherError(
                    ErrorCode.INVALID,
                    f"{entry.path} on node '{entry.node}' is {device.vendor_id}:"
                    f"{device.device_id}, not {entry.vendor_id}:{entry.device_id}",
                    details={"field": "map"},
                )

    async def create(self, command: MappingCreate) -> Done:
        """Add a mapping."""
        await self.check(command.mapping)
        await self.book.create(command.mapping)
        return Done()

    async def update(self, command: MappingUpdate) -> Done:
        """Replace a mapping, guarded by its digest."""
        await self.check(command.mapping)
        await self.book.replace(command.mapping, command.digest)
        return Done()

    async def delete(self, command: MappingDelete) -> Done:
        """Remove a mapping."""
        await self.book.delete(command.id)
        return Done()

    async def list(self, query: MappingListQuery) -> MappingListing:
        """Every mapping, or the one asked for (``not_found`` if it does not exist)."""
        states = await self.book.states(query.id)
        if query.id is not None and not states:
            raise RucherError(ErrorCode.NOT_FOUND, f"PCI mapping '{query.id}' does not exist")
        return MappingListing(mappings=tuple(states))
