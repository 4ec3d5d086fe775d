"""``hostpciN``: a VM's PCI devices leased from its node's GPU broker while it runs.

On start the agent asks the broker (``rpc.gpu.device_allocate.{node}``) for each ``hostpciN``
of the config (a host address or a cluster ``mapping``, whole or as an ``mdev``), and puts the
``<hostdev>`` elements it returns into the domain. The leases are the guest's: they are given
back (``cmd.gpu.device_release.{node}``) when the start fails, on stop and on destroy.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.compute.domain_xml import HOSTPCI_KEY, DomainConfigError, parse_hostpci
from rucher.proto import gpu
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import DeviceAllocate, DeviceAllocation, GpuKind, ReleaseReason
from rucher.proto.guest import GuestType

log = structlog.get_logger("rucher.compute.gpu")

# Proxmox's HOSTPCIID: [domain:]bus:slot[.function]; without a function, the whole device.
PCI_ID = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})(?:\.([0-7]))?$")
MAPPING_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
BROKER_TIMEOUT = 60.0
# How long a start waits for a release still on its way (a stale lease of the stopped guest).
RELEASE_PATIENCE = 15.0

Note = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class HostPci:
    """One ``hostpciN`` as the broker is asked for it: by address or mapping, whole or mdev."""

    key: str
    address: str | None = None
    mapping: str | None = None
    mdev_type: str | None = None


class Broker(Protocol):
    """This node's GPU broker as the compute agent uses it."""

    async def allocate(self, command: DeviceAllocate) -> DeviceAllocation:
        """Lease a device to a guest; a retry with the same ``command_id`` gets the same lease."""

    async def release(self, vmid: int, reason: ReleaseReason) -> None:
        """Give back every lease ``vmid`` holds on this node (durably, applied once)."""

    async def mapping_exists(self, name: str) -> bool:
        """Whether the cluster has the PCI mapping ``name``."""


class BusBroker:
    """The broker over the bus: ``rpc.gpu.device_allocate``, ``cmd.gpu.device_release``."""

    def __init__(self, bus: Bus, timeout: float = BROKER_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout

    async def allocate(self, command: DeviceAllocate) -> DeviceAllocation:
        """Ask this node's broker for a lease."""
        return await self.bus.request(
            gpu.DEVICE_ALLOCATE.to(node=self.bus.node), command, timeout=self.timeout
        )

    async def release(self, vmid: int, reason: ReleaseReason) -> None:
        """Queue the release of ``vmid``'s leases on the command stream."""
        command = gpu.DeviceRelease(command_id=new_id(), vmid=vmid, reason=reason)
        await self.bus.publish(gpu.DEVICE_RELEASE.to(node=self.bus.node), command)

    async def mapping_exists(self, name: str) -> bool:
        """Look the mapping up (``rpc.gpu.mapping_list``)."""
        listing = await self.bus.request(
            gpu.MAPPING_LIST.address, gpu.MappingListQuery(id=name), timeout=self.timeout
        )
        return any(state.mapping.id == name for state in listing.mappings)


def _invalid(key: str, message: str) -> RucherError:
    return RucherError(ErrorCode.INVALID, f"{key}: {message}", details={"field": key})


def parse(key: str, value: str) -> HostPci:
    """A ``hostpciN`` value as a request; raises ``DomainConfigError`` naming ``key``."""
    options = parse_hostpci(value, key)
    host, mapping = options.get("host"), options.get("mapping")
    if (host is None) == (mapping is None):
        raise DomainConfigError(key, "give either a host PCI address or 'mapping', not both")
    mdev = options.get("mdev")
    mdev_type = str(mdev) if mdev else None
    if mapping is not None:
        if not MAPPING_ID.match(str(mapping)):
            raise DomainConfigError(key, f"invalid mapping id '{mapping}'")
        return HostPci(key=key, mapping=str(mapping), mdev_type=mdev_type)
    text = str(host)
    if ";" in text:
        raise DomainConfigError(key, "one host device per hostpci slot is supported")
    found = PCI_ID.match(text)
    if found is None:
        raise DomainConfigError(key, f"invalid PCI ID '{text}'")
    domain, bus, slot, function = found.groups()
    address = f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{function or '0'}"
    return HostPci(key=key, address=address, mdev_type=mdev_type)


def requests(config: Mapping[str, str]) -> list[HostPci]:
    """Every ``hostpciN`` of ``config``, in slot order; raises ``invalid`` naming the key."""
    found = []
    for key in sorted((k for k in config if HOSTPCI_KEY.match(k)), key=lambda k: int(k[7:])):
        try:
            found.append(parse(key, config[key]))
        except DomainConfigError as err:
            raise _invalid(err.field, err.message) from err
    return found


async def check_mappings(broker: Broker | None, config: Mapping[str, str]) -> None:
    """Refuse (``invalid`` naming the key) a ``hostpciN`` that names an unknown mapping."""
    wanted = [request for request in requests(config) if request.mapping is not None]
    if not wanted:
        return
    if broker is None:
        raise _invalid(wanted[0].key, "PCI mappings need the GPU broker, which is not wired")
    for request in wanted:
        assert request.mapping is not None
        if not await broker.mapping_exists(request.mapping):
            raise _invalid(request.key, f"no such PCI mapping '{request.mapping}'")


async def lease(
    broker: Broker | None,
    vmid: int,
    config: Mapping[str, str],
    command_id: str,
    note: Note,
    *,
    patience: float = RELEASE_PATIENCE,
) -> dict[str, str]:
    """Lease every ``hostpciN`` of a stopped guest; its ``<hostdev>`` XML by key.

    Leases the guest still holds are stale (it is stopped): their release is queued first and
    an allocation refused because one is still there is retried for ``patience`` seconds. If a
    device cannot be had, what was leased is given back and the error names the key.
    """
    wanted = requests(config)
    if not wanted:
        return {}
    if broker is None:
        raise _invalid(wanted[0].key, "PCI passthrough needs the GPU broker, which is not wired")
    await broker.release(vmid, ReleaseReason.GUEST_STOPPED)
    hostdevs: dict[str, str] = {}
    try:
        for request in wanted:
            allocation = await _allocate(broker, vmid, request, command_id, patience)
            hostdevs[request.key] = _hostdev(request.key, allocation)
            await note(
                f"{request.key}: leased {allocation.lease.kind.value} "
                f"{allocation.lease.address} (lease {allocation.lease.lease_id})"
            )
    except BaseException:
        if hostdevs:
            await give_back(broker, vmid, ReleaseReason.ALLOCATION_FAILED)
        raise
    return hostdevs


async def _allocate(
    broker: Broker, vmid: int, request: HostPci, command_id: str, patience: float
) -> DeviceAllocation:
    command = DeviceAllocate(
        command_id=f"{command_id}.{request.key}",
        vmid=vmid,
        guest_type=GuestType.QEMU,
        kind=GpuKind.MDEV if request.mdev_type else GpuKind.PASSTHROUGH,
        slot=request.key,
        mapping=request.mapping,
        address=request.address,
        mdev_type=request.mdev_type,
    )
    deadline = time.monotonic() + patience
    while True:
        try:
            return await broker.allocate(command)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS and time.monotonic() < deadline:
                await asyncio.sleep(0.2)  # the stale lease's release is on its way
                continue
            details = {**(err.details or {}), "field": request.key}
            raise RucherError(err.code, f"{request.key}: {err.message}", details=details) from err


def _hostdev(key: str, allocation: DeviceAllocation) -> str:
    if not allocation.libvirt_hostdev:
        raise _invalid(key, "the broker gave no libvirt device for the lease")
    return allocation.libvirt_hostdev


async def give_back(broker: Broker | None, vmid: int, reason: ReleaseReason) -> None:
    """Queue the release of ``vmid``'s leases; a failure is logged (the broker reconciles)."""
    if broker is None:
        return
    try:
        await broker.release(vmid, reason)
    except RucherError as err:
        log.warning("gpu_release_not_queued", vmid=vmid, reason=reason.value, error=err.message)


def has_devices(config: Mapping[str, str]) -> bool:
    """Whether ``config`` passes PCI devices through."""
    return any(HOSTPCI_KEY.match(key) for key in config)
