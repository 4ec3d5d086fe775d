"""What the broker needs from the cluster: its leases, the mappings, the guests, events."""

from __future__ import annotations

from typing import Protocol

from rucher.proto.gpu import GpuInventory, GpuLease, PciMapping, ReleaseReason


class LeaseStore(Protocol):
    """This node's leases in the cluster store."""

    async def load(self) -> list[GpuLease]:
        """Every lease recorded for this node."""
        ...

    async def record(self, lease: GpuLease) -> None:
        """Record a lease (create or replace)."""
        ...

    async def remove(self, lease_id: str) -> None:
        """Forget a lease; nothing happens if it is not recorded."""
        ...


class MappingSource(Protocol):
    """The cluster-wide PCI mappings."""

    async def mapping(self, mapping_id: str) -> PciMapping | None:
        """The mapping named ``mapping_id``, or None."""
        ...

    async def all(self) -> list[PciMapping]:
        """Every mapping."""
        ...


class GuestDirectory(Protocol):
    """Which guests the cluster store places on this node."""

    async def on_node(self) -> set[int]:
        """The VMIDs of the guests whose record names this node."""
        ...


class Events(Protocol):
    """The broker's events."""

    async def inventory(self, inventory: GpuInventory) -> None:
        """Publish the node's inventory."""
        ...

    async def allocated(self, lease: GpuLease) -> None:
        """Publish that a lease was made."""
        ...

    async def released(self, lease: GpuLease, reason: ReleaseReason) -> None:
        """Publish that a lease ended."""
        ...
