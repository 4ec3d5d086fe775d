"""``hostpciN``: a VM's PCI devices leased from its node's GPU broker while it runs.

On start the agent asks the broker (``rpc.gpu.device_allocate.{node}``) for each ``hostpciN``
of the config (a host address or a cluster ``mapping``, whole or as an ``mdev``), and puts the
``<hostdev>`` elements it returns into the domain. The leases are the guest's: they are given
back (``cmd.gpu.device_release.{node}``) when the start fails, on stop and on destroy.

Releases are durable commands the broker applies later, so each names its lease: a release
still on its way can never end a lease made after it. The leases a guest holds are read from
the broker's record (the ``gpu_leases`` bucket).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from rucher.bus import KV, Bus, RucherError
from rucher.bus.client import new_id
from rucher.compute.domain_xml import HOSTPCI_KEY, DomainConfigError, domain_name, parse_hostpci
from rucher.proto import gpu
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import DeviceAllocate, DeviceAllocation, GpuKind, GpuLease, ReleaseReason
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.keys import make_key
from rucher.proto.streams import GPU_LEASES

if TYPE_CHECKING:
    from rucher.compute.ports import TaskLog
    from rucher.compute.service import ComputeService

log = structlog.get_logger("rucher.compute.gpu")

# Proxmox's HOSTPCIID: [domain:]bus:slot[.function]; without a function, the whole device.
PCI_ID = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})(?:\.([0-7]))?$")
MAPPING_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
BROKER_TIMEOUT = 60.0
# How long a start waits for the broker to end the stale leases of the stopped guest.
RELEASE_PATIENCE = 15.0
POLL = 0.1

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

    async def leases(self, vmid: int) -> list[GpuLease]:
        """The leases ``vmid`` holds on this node, as the broker recorded them."""

    async def release(self, vmid: int, lease_id: str, reason: ReleaseReason) -> None:
        """Give back one lease of ``vmid`` (durably, applied once, maybe later)."""

    async def mapping_exists(self, name: str) -> bool:
        """Whether the cluster has the PCI mapping ``name``."""


class BusBroker:
    """The broker over the bus: ``rpc.gpu.device_allocate``, ``cmd.gpu.device_release``."""

    def __init__(self, bus: Bus, timeout: float = BROKER_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout
        self.records: KV[GpuLease] = KV(bus, GPU_LEASES, GpuLease)

    async def allocate(self, command: DeviceAllocate) -> DeviceAllocation:
        """Ask this node's broker for a lease."""
        return await self.bus.request(
            gpu.DEVICE_ALLOCATE.to(node=self.bus.node), command, timeout=self.timeout
        )

    async def leases(self, vmid: int) -> list[GpuLease]:
        """Read this node's keys of the ``gpu_leases`` bucket."""
        entries = await self.records.entries(f"{make_key(self.bus.node)}.>")
        return [e.value for e in entries if e.value is not None and e.value.vmid == vmid]

    async def release(self, vmid: int, lease_id: str, reason: ReleaseReason) -> None:
        """Queue the lease's release on the command stream."""
        command = gpu.DeviceRelease(
            command_id=new_id(), vmid=vmid, reason=reason, lease_id=lease_id
        )
        await self.bus.publish(gpu.DEVICE_RELEASE.to(node=self.bus.node), command)

    async def mapping_exists(self, name: str) -> bool:
        """Look the mapping up (``rpc.gpu.mapping_list``; an unknown id is ``not_found``)."""
        try:
            listing = await self.bus.request(
                gpu.MAPPING_LIST.address, gpu.MappingListQuery(id=name), timeout=self.timeout
            )
        except RucherError as err:
            if err.code is ErrorCode.NOT_FOUND:
                return False
            raise
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

    Leases the guest still holds are stale (it is stopped, they were not given back): they are
    released first, and the start waits up to ``patience`` seconds for the broker to end them.
    If a device cannot be had, what was leased is given back and the error names the key.
    """
    wanted = requests(config)
    if not wanted:
        return {}
    if broker is None:
        raise _invalid(wanted[0].key, "PCI passthrough needs the GPU broker, which is not wired")
    await _end_stale(broker, vmid, wanted[0].key, note, patience)
    hostdevs: dict[str, str] = {}
    held: list[str] = []
    try:
        for request in wanted:
            allocation = await _allocate(broker, vmid, request, command_id)
            held.append(allocation.lease.lease_id)
            hostdevs[request.key] = _hostdev(request.key, allocation)
            await note(
                f"{request.key}: leased {allocation.lease.kind.value} "
                f"{allocation.lease.address} (lease {allocation.lease.lease_id})"
            )
    except BaseException:
        for lease_id in held:
            await _release(broker, vmid, lease_id, ReleaseReason.ALLOCATION_FAILED)
        raise
    return hostdevs


async def _end_stale(broker: Broker, vmid: int, key: str, note: Note, patience: float) -> None:
    stale = await broker.leases(vmid)
    if not stale:
        return
    for old in stale:
        await note(f"{old.slot}: ending stale lease {old.lease_id} ({old.address})")
        await broker.release(vmid, old.lease_id, ReleaseReason.GUEST_STOPPED)
    deadline = time.monotonic() + patience
    while await broker.leases(vmid):
        if time.monotonic() > deadline:
            raise RucherError(
                ErrorCode.CONFLICT,
                f"{key}: the GPU broker did not end the stopped guest's leases in time",
                details={"field": key},
            )
        await asyncio.sleep(POLL)


async def _allocate(
    broker: Broker, vmid: int, request: HostPci, command_id: str
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
    try:
        return await broker.allocate(command)
    except RucherError as err:
        details = {**(err.details or {}), "field": request.key}
        raise RucherError(err.code, f"{request.key}: {err.message}", details=details) from err


def _hostdev(key: str, allocation: DeviceAllocation) -> str:
    if not allocation.libvirt_hostdev:
        raise _invalid(key, "the broker gave no libvirt device for the lease")
    return allocation.libvirt_hostdev


async def _release(broker: Broker, vmid: int, lease_id: str, reason: ReleaseReason) -> None:
    try:
        await broker.release(vmid, lease_id, reason)
    except RucherError as err:
        log.warning("gpu_release_not_queued", vmid=vmid, lease=lease_id, error=err.message)


async def give_back(broker: Broker | None, vmid: int, reason: ReleaseReason) -> None:
    """Queue the release of each lease ``vmid`` holds; failures are logged, not raised.

    The broker also ends a guest's leases when it stops, and reconciles what no guest holds.
    """
    if broker is None:
        return
    try:
        held = await broker.leases(vmid)
    except RucherError as err:
        log.warning("gpu_leases_not_read", vmid=vmid, error=err.message)
        return
    for old in held:
        await _release(broker, vmid, old.lease_id, reason)


def has_devices(config: Mapping[str, str]) -> bool:
    """Whether ``config`` passes PCI devices through."""
    return any(HOSTPCI_KEY.match(key) for key in config)


async def define_and_start(
    service: ComputeService,
    record: GuestRecord,
    command_id: str,
    task: TaskLog,
    before_start: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Lease the guest's PCI devices, define its domain with them and start it.

    ``before_start`` runs just before libvirt starts the domain (a fencing check). The leases
    are given back if the domain cannot be defined or started.
    """
    broker = service.gpu_broker
    hostdevs = await lease(broker, record.vmid, record.config, command_id, task.log)
    try:
        await service.define(record, hostdevs)
        if before_start is not None:
            await before_start()
        await service.hypervisor.start(domain_name(record.vmid))
    except BaseException:
        if hostdevs:
            await task.log("start failed: giving the PCI devices back")
            await give_back(broker, record.vmid, ReleaseReason.ALLOCATION_FAILED)
        raise


async def start_created(
    service: ComputeService,
    vmid: int,
    config: Mapping[str, str],
    command_id: str,
    task: TaskLog,
) -> None:
    """Start a guest its create just defined; one with PCI devices is defined with them first."""
    if has_devices(config):
        await define_and_start(service, await service.guests.get(vmid), command_id, task)
    else:
        await service.hypervisor.start(domain_name(vmid))


async def devices_stopped(service: ComputeService, vmid: int) -> None:
    """Give back the PCI devices of a guest that stopped (if its config has any)."""
    record = await service.guests.get(vmid)
    if has_devices(record.config):
        await give_back(service.gpu_broker, vmid, ReleaseReason.GUEST_STOPPED)
