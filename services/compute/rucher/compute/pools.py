"""Resource pool membership of this node's guests, kept by the IAM service.

A clone (or create) with ``pool`` joins the new VM to it; a destroyed VM leaves every pool, as
Proxmox's ``remove_vm_access`` does. Membership is bookkeeping around the guest: a failure to
leave is logged in the task and does not fail the destroy.
"""

from __future__ import annotations

from typing import Protocol

from rucher.bus import Bus
from rucher.bus.client import new_id
from rucher.proto import iam

POOL_TIMEOUT = 10.0


class PoolDirectory(Protocol):
    """The IAM service's pools, as this node's agent uses them."""

    async def exists(self, poolid: str) -> bool:
        """Whether pool ``poolid`` exists."""

    async def join(self, poolid: str, vmid: int, actor: str) -> None:
        """Add ``vmid`` to pool ``poolid``."""

    async def leave(self, vmid: int, actor: str) -> list[str]:
        """Remove ``vmid`` from every pool; the pools it left."""


class BusPools:
    """Pools over the bus: ``rpc.iam.pool_list`` and ``rpc.iam.pool_update``."""

    def __init__(self, bus: Bus, timeout: float = POOL_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout

    async def _pools(self) -> list[tuple[str, tuple[int, ...]]]:
        listing = await self.bus.request(
            iam.POOL_LIST.address, iam.PoolListQuery(), timeout=self.timeout
        )
        return [(pool.poolid, pool.vms) for pool in listing.pools]

    async def exists(self, poolid: str) -> bool:
        """Whether the pool exists."""
        return any(found == poolid for found, _ in await self._pools())

    async def join(self, poolid: str, vmid: int, actor: str) -> None:
        """Add the VM to the pool."""
        command = iam.PoolUpdate(command_id=new_id(), actor=actor, poolid=poolid, vms=(vmid,))
        await self.bus.request(iam.POOL_UPDATE.address, command, timeout=self.timeout)

    async def leave(self, vmid: int, actor: str) -> list[str]:
        """Remove the VM from each pool that lists it."""
        left: list[str] = []
        for poolid, vms in await self._pools():
            if vmid not in vms:
                continue
            command = iam.PoolUpdate(
                command_id=new_id(), actor=actor, poolid=poolid, vms=(vmid,), delete=True
            )
            await self.bus.request(iam.POOL_UPDATE.address, command, timeout=self.timeout)
            left.append(poolid)
        return left
