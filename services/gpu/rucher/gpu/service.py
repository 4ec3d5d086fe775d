"""The GPU broker: leases of whole devices, mdevs, MIG slices and VFs, owned by guests.

Every allocation and release runs under one lock per node, on a view re-read from the host
first, so a device is never handed out twice. Each host change is bracketed by two records: a
pending lease (what is about to change, and the drivers to restore) before it and the lease
after it; if the second record cannot be written the change is undone. A crash in between
leaves the pending lease, which :meth:`GpuBroker.reconcile` undoes at the next start, so what
the broker never finished leaves nothing behind, and nothing it did not make is touched.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog

from rucher.bus import RucherError
from rucher.gpu.host import VFIO, Host, HostError
from rucher.gpu.hostdev import libvirt_hostdev, lxd_device
from rucher.gpu.mig import choose_mig, geometry_of, state_of
from rucher.gpu.ports import Events, GuestDirectory, LeaseStore, MappingSource
from rucher.gpu.selection import (
    NodeView,
    busy_reason,
    describe,
    group_functions,
    is_gpu,
    of_interest,
)
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import (
    DeviceAllocate,
    DeviceAllocation,
    DeviceRelease,
    GpuInventory,
    GpuKind,
    GpuLease,
    MigInstance,
    MigProfile,
    PciDevice,
    PciListing,
    PciListQuery,
    ReleaseReason,
)
from rucher.proto.guest import GuestType

log = structlog.get_logger("rucher.gpu.service")

S = TypeVar("S", bound=msgspec.Struct)


def _refuse(message: str, field: str, code: ErrorCode = ErrorCode.CONFLICT) -> RucherError:
    return RucherError(code, message, details={"field": field})


class GpuBroker:
    """One node's device leases, kept consistent with the host and the cluster store."""

    def __init__(  # noqa: PLR0917 - the composition root passes each port by position
        self,
        node: str,
        host: Host,
        leases: LeaseStore,
        events: Events,
        mappings: MappingSource,
        guests: GuestDirectory,
        *,
        clock: Callable[[], float] = time.time,
        release_grace: float = 60.0,
    ) -> None:
        self.node = node
        self.host = host
        self.store = leases
        self.events = events
        self.mappings = mappings
        self.guests = guests
        self.clock = clock
        self.release_grace = release_grace
        self.view = NodeView()
        self.lock = asyncio.Lock()
        self._published: GpuInventory | None = None

    # The view ----------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read every device and mediated device from the host."""
        devices, version = await self.host.discover()
        self.view.devices = {device.address: device for device in devices}
        self.view.driver_version = version
        self.view.mdevs = await self.host.mdevs()

    def annotated(self, device: PciDevice) -> PciDevice:
        """``device`` with its lease marked, and free MIG placements filled in."""
        holder = self.view.holder(device.address)
        changes: dict[str, Any] = {"lease_id": holder.lease_id if holder else None}
        if device.mig_enabled and device.mig_profiles:
            by_gi = {
                lease.mig_instance.gpu_instance_id: lease.lease_id
                for lease in self.view.leases.values()
                if lease.address == device.address and lease.mig_instance is not None
            }
            changes["mig_instances"] = tuple(
                _replace(instance, lease_id=by_gi.get(instance.gpu_instance_id))
                for instance in device.mig_instances
            )
            geometry = geometry_of(device.mig_profiles)
            state = state_of(device.mig_profiles, device.mig_instances)
            changes["mig_profiles"] = tuple(
                _replace(p, free_placements=tuple(geometry.free_placements(state, p.name)))
                for p in device.mig_profiles
            )
        return _replace(device, **changes)

    async def inventory(self) -> GpuInventory:
        """The devices of interest, leases marked, as the scheduler reads them."""
        mapped = {
            entry.path
            for mapping in await self.mappings.all()
            for entry in mapping.map
            if entry.node == self.node
        }
        devices = tuple(
            self.annotated(device)
            for address, device in sorted(self.view.devices.items())
            if of_interest(device, mapped)
        )
        claims = tuple(
            sorted({lease.claim_id for lease in self.view.leases.values() if lease.claim_id})
        )
        return GpuInventory(
            node=self.node,
            devices=devices,
            time=self.clock(),
            driver_version=self.view.driver_version,
            claims=claims,
        )

    async def publish(self, *, force: bool = False) -> None:
        """Publish the inventory if it changed since the last one (or when ``force``)."""
        inventory = await self.inventory()
        last = self._published
        if not force and last is not None and _replace(last, time=inventory.time) == inventory:
            return
        self._published = inventory
        await self.events.inventory(inventory)

    async def rediscover(self) -> None:
        """Read the host again and publish the inventory if anything changed."""
        async with self.lock:
            await self.refresh()
        await self.publish()

    async def list_pci(self, query: PciListQuery) -> PciListing:
        """Every PCI function of the node, leases marked."""
        async with self.lock:
            await self.refresh()
            return PciListing(
                devices=tuple(
                    self.annotated(device) for _, device in sorted(self.view.devices.items())
                )
            )

    # Allocation --------------------------------------------------------------------------------

    async def allocate(self, command: DeviceAllocate) -> DeviceAllocation:
        """Lease a device to a guest; a retry (same ``command_id``) gets the same lease."""
        async with self.lock:
            for lease in self.view.leases.values():
                if lease.vmid == command.vmid and lease.slot == command.slot:
                    if lease.command_id == command.command_id:
                        return _allocation(lease)
                    raise _refuse(
                        f"{describe(lease)} already holds a {lease.kind.value} lease "
                        f"({lease.address}): release it first",
                        "slot",
                        ErrorCode.EXISTS,
                    )
            await self.refresh()
            candidates = await self._candidates(command)
            if command.kind is GpuKind.MIG:
                lease = await self._allocate_mig(command, candidates)
            elif command.kind is GpuKind.MDEV:
                lease = await self._allocate_mdev(command, candidates)
            else:
                lease = await self._allocate_whole(command, candidates)
            self.view.leases[lease.lease_id] = lease
            await self.refresh()
        await self.events.allocated(lease)
        await self.publish()
        log.info("device_allocated", lease=lease.lease_id, vmid=lease.vmid, kind=lease.kind.value,
                 address=lease.address)  # fmt: skip
        return _allocation(lease)

    async def _candidates(self, command: DeviceAllocate) -> list[PciDevice]:
        """The devices the request names (mapping, address), or every one of the model."""
        devices = self.view.devices
        if command.mapping is not None:
            mapping = await self.mappings.mapping(command.mapping)
            if mapping is None:
                raise _refuse(
                    f"PCI mapping '{command.mapping}' does not exist",
                    "mapping",
                    ErrorCode.NOT_FOUND,
                )
            if command.kind is GpuKind.MDEV and not mapping.mdev:
                raise _refuse(
                    f"PCI mapping '{mapping.id}' does not allow mediated devices",
                    "mapping",
                    ErrorCode.INVALID,
                )
            entries = [entry for entry in mapping.map if entry.node == self.node]
            if not entries:
                raise _refuse(
                    f"PCI mapping '{mapping.id}' has no device on node '{self.node}'",
                    "mapping",
                    ErrorCode.INVALID,
                )
            found = []
            for entry in entries:
                device = devices.get(entry.path)
                if device is None:
                    raise _refuse(
                        f"PCI mapping '{mapping.id}' names {entry.path}, which node "
                        f"'{self.node}' does not have",
                        "mapping",
                        ErrorCode.INVALID,
                    )
                if (device.vendor_id, device.device_id) != (entry.vendor_id, entry.device_id):
                    raise _refuse(
                        f"PCI mapping '{mapping.id}': {entry.path} is "
                        f"{device.vendor_id}:{device.device_id}, not the mapped "
                        f"{entry.vendor_id}:{entry.device_id} (hardware changed?)",
                        "mapping",
                        ErrorCode.INVALID,
                    )
                found.append(device)
            return found
        if command.address is not None:
            device = devices.get(command.address)
            if device is None:
                raise _refuse(
                    f"node '{self.node}' has no PCI device {command.address}",
                    "address",
                    ErrorCode.NOT_FOUND,
                )
            if command.kind is GpuKind.VF and device.physfn is None:
                return [devices[a] for a in sorted(devices) if devices[a].physfn == device.address]
            return [device]
        return [
            device
            for _, device in sorted(devices.items())
            if command.vendor_id in (None, device.vendor_id)
            and command.device_id in (None, device.device_id)
        ]

    def _new_lease(self, command: DeviceAllocate, address: str, **fields: Any) -> GpuLease:
        return GpuLease(
            lease_id=str(uuid.uuid4()),
            node=self.node,
            vmid=command.vmid,
            guest_type=command.guest_type,
            kind=command.kind,
            address=address,
            slot=command.slot,
            created=self.clock(),
            command_id=command.command_id,
            claim_id=command.claim_id,
            **fields,
        )

    async def _record(self, lease: GpuLease) -> GpuLease:
        """Record the lease; give its device back if the record cannot be written."""
        try:
            await self.store.record(lease)
        except BaseException:
            await self._undo(lease)
            raise
        return lease

    async def _with_intent(
        self, pending: GpuLease, change: Callable[[], Awaitable[GpuLease]], field: str
    ) -> GpuLease:
        """Record ``pending``, make the host change, then record the lease it produced.

        A crash between the two records leaves the pending one, which the next start undoes.
        """
        await self.store.record(pending)
        try:
            lease = await change()
        except HostError as err:
            await self.store.remove(pending.lease_id)  # the change undid itself
            raise _refuse(str(err), field) from err
        return await self._record(lease)

    async def _allocate_whole(
        self, command: DeviceAllocate, candidates: list[PciDevice]
    ) -> GpuLease:
        """Passthrough of a GPU (its whole IOMMU group) or of a VF."""
        vf = command.kind is GpuKind.VF
        named = command.mapping is not None or command.address is not None
        wanted = [d for d in candidates if (d.physfn is not None if vf else is_gpu(d) or named)]
        if not wanted:
            what = "SR-IOV virtual function" if vf else "GPU"
            raise _refuse(f"node '{self.node}' has no {what} matching the request", "kind")
        vm = command.guest_type is GuestType.QEMU
        reasons = []
        for device in wanted:
            if device.mig_enabled and not vf:
                reasons.append(f"{device.address} is in MIG mode (ask for a MIG slice)")
                continue
            if vm:
                functions, reason = group_functions(self.view, device)
            else:
                functions, reason = [device.address], busy_reason(self.view, device)
            if reason is not None:
                reasons.append(reason)
                continue
            if not vm:
                return await self._record(self._new_lease(command, device.address))
            return await self._bind(command, device.address, functions)
        if named or len(reasons) == 1:
            raise _refuse(f"cannot pass through: {'; '.join(reasons)}", "address")
        raise _refuse(f"no free device on node '{self.node}': {'; '.join(reasons)}", "kind")

    async def _bind(self, command: DeviceAllocate, address: str, functions: list[str]) -> GpuLease:
        """Bind every function to vfio-pci, undoing all of them if one fails."""
        originals = {f: self.view.devices[f].driver or "" for f in functions}
        pending = self._new_lease(command, address, original_drivers=originals, pending=True)

        async def change() -> GpuLease:
            bound: dict[str, str] = {}
            try:
                for function in functions:
                    bound[function] = await self.host.bind_vfio(function)
            except HostError as err:
                for function, original in reversed(bound.items()):
                    if original != VFIO:
                        await self.host.restore_driver(function, original)
                raise HostError(f"binding to vfio-pci failed: {err}") from err
            return _replace(pending, original_drivers=bound, pending=False)

        return await self._with_intent(pending, change, "address")

    async def _allocate_mdev(
        self, command: DeviceAllocate, candidates: list[PciDevice]
    ) -> GpuLease:
        """A mediated device of the requested type, on the device with the fewest left."""
        if command.guest_type is not GuestType.QEMU:
            raise _refuse("mediated devices serve VMs only", "kind", ErrorCode.UNSUPPORTED)
        type_id = command.mdev_type
        if type_id is None:
            raise _refuse("an mdev request names its mdev_type", "mdev_type", ErrorCode.INVALID)
        offering = [
            (kind.available_instances, device.address)
            for device in candidates
            for kind in device.mdev_types
            if kind.type_id == type_id and self.view.holder(device.address) is None
        ]
        if not offering:
            raise _refuse(
                f"no device on node '{self.node}' offers mdev type '{type_id}'", "mdev_type"
            )
        free = sorted(entry for entry in offering if entry[0] > 0)
        if not free:
            raise _refuse(f"mdev type '{type_id}' has no free instance left", "mdev_type")
        address = free[0][1]
        lease = self._new_lease(command, address, mdev_type=type_id)
        # The mdev is named after its lease, so a leftover is found by name.
        pending = _replace(lease, mdev_uuid=lease.lease_id, pending=True)

        async def change() -> GpuLease:
            try:
                await self.host.create_mdev(address, type_id, lease.lease_id)
            except HostError as err:
                raise HostError(f"creating the mediated device failed: {err}") from err
            return _replace(pending, pending=False)

        return await self._with_intent(pending, change, "mdev_type")

    async def _allocate_mig(self, command: DeviceAllocate, candidates: list[PciDevice]) -> GpuLease:
        """A MIG GPU instance and its compute instance, where larger profiles stay possible."""
        if command.guest_type is not GuestType.LXC:
            raise _refuse(
                "a VM gets a MIG slice through a MIG-backed vGPU type: ask for kind=mdev",
                "kind",
                ErrorCode.UNSUPPORTED,
            )
        name = command.mig_profile
        if name is None:
            raise _refuse("a MIG request names its mig_profile", "mig_profile", ErrorCode.INVALID)
        gpus = [
            device
            for device in candidates
            if device.mig_enabled and any(p.name == name for p in device.mig_profiles)
        ]
        if not gpus:
            raise _refuse(
                f"no GPU in MIG mode on node '{self.node}' offers profile '{name}'",
                "mig_profile",
                ErrorCode.INVALID,
            )
        gpus = [d for d in gpus if self.view.holder(d.address) is None]
        shapes = [
            (geometry_of(d.mig_profiles), state_of(d.mig_profiles, d.mig_instances)) for d in gpus
        ]
        choice = choose_mig(shapes, name)
        if choice is None:
            raise _refuse(
                f"MIG profile '{name}' has no legal free placement on node '{self.node}'",
                "mig_profile",
            )
        device = gpus[choice.gpu]
        profile = _profile(device.mig_profiles, name)
        intended = MigInstance(gpu_instance_id=0, profile_id=profile.profile_id,
                               placement=choice.placement)  # fmt: skip
        pending = self._new_lease(command, device.address, mig_instance=intended, pending=True)

        async def change() -> GpuLease:
            try:
                made = await self.host.create_mig(
                    device.address, profile.profile_id, choice.placement
                )
            except HostError as err:
                raise HostError(f"creating the MIG instance failed: {err}") from err
            return _replace(pending, mig_instance=made, pending=False)

        return await self._with_intent(pending, change, "mig_profile")

    # Release -----------------------------------------------------------------------------------

    async def release(self, command: DeviceRelease) -> None:
        """End one lease, or every lease the guest holds on this node."""
        async with self.lock:
            ended = [
                lease
                for lease in self.view.leases.values()
                if lease.vmid == command.vmid and command.lease_id in (None, lease.lease_id)
            ]
            for lease in ended:
                await self._undo(lease)
                await self.store.remove(lease.lease_id)
                del self.view.leases[lease.lease_id]
            if ended:
                await self.refresh()
        for lease in ended:
            await self.events.released(lease, command.reason)
            log.info("device_released", lease=lease.lease_id, vmid=lease.vmid,
                     reason=command.reason.value)  # fmt: skip
        if ended:
            await self.publish()

    async def _undo(self, lease: GpuLease) -> None:
        """Give a lease's device back: restore drivers, remove the mdev, destroy the MIG slice.

        Each step first checks the host, so a pending lease whose change never happened, or a
        device already given back, is left alone.
        """
        if lease.mdev_uuid is not None:
            if any(m.uuid == lease.mdev_uuid for m in await self.host.mdevs()):
                await self.host.remove_mdev(lease.mdev_uuid)
        elif lease.mig_instance is not None:
            wanted = lease.mig_instance
            others = {
                other.mig_instance.gpu_instance_id
                for other in self.view.leases.values()
                if other.lease_id != lease.lease_id
                and other.address == lease.address
                and other.mig_instance is not None
                and not other.pending
            }
            for instance in await self.host.mig_instances(lease.address):
                same = (
                    instance.placement == wanted.placement
                    and instance.profile_id == wanted.profile_id
                    if lease.pending
                    else instance.gpu_instance_id == wanted.gpu_instance_id
                )
                if same and instance.gpu_instance_id not in others:
                    await self.host.destroy_mig(lease.address, instance)
        for address, original in reversed(lease.original_drivers.items()):
            if original != VFIO and await self._driver(address) == VFIO:
                await self.host.restore_driver(address, original)

    async def _driver(self, address: str) -> str | None:
        device = await self.host.device(address)
        return device.driver if device is not None else None

    # Reconciliation ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Rebuild from host and store: undo interrupted allocations, free what no guest holds."""
        async with self.lock:
            self.view.leases = {lease.lease_id: lease for lease in await self.store.load()}
            await self.refresh()
            interrupted = [lease for lease in self.view.leases.values() if lease.pending]
            for lease in interrupted:
                log.warning("interrupted_allocation_undone", lease=lease.lease_id, vmid=lease.vmid)
                await self._undo(lease)
                await self._forget(lease)
            await self.refresh()
            stale = [lease for lease in self.view.leases.values() if not self._present(lease)]
            for lease in stale:
                log.warning("lease_lost_on_host", lease=lease.lease_id, vmid=lease.vmid)
                await self._forget(lease)
            guests = await self.guests.on_node()
            horizon = self.clock() - self.release_grace
            gone = [
                lease
                for lease in self.view.leases.values()
                if lease.vmid not in guests and lease.created < horizon
            ]
            for lease in gone:
                log.warning("lease_without_guest", lease=lease.lease_id, vmid=lease.vmid)
                await self._undo(lease)
                await self._forget(lease)
            await self.refresh()
        for lease in [*stale, *gone]:
            await self.events.released(lease, ReleaseReason.RECONCILED)
        await self.publish(force=True)

    async def _forget(self, lease: GpuLease) -> None:
        await self.store.remove(lease.lease_id)
        self.view.leases.pop(lease.lease_id, None)

    def _present(self, lease: GpuLease) -> bool:
        """Whether the host still has what the lease holds."""
        device = self.view.devices.get(lease.address)
        if device is None:
            return False
        if lease.mdev_uuid is not None:
            return any(m.uuid == lease.mdev_uuid for m in self.view.mdevs)
        if lease.mig_instance is not None:
            return any(
                i.gpu_instance_id == lease.mig_instance.gpu_instance_id
                and i.placement == lease.mig_instance.placement
                for i in device.mig_instances
            )
        return all(
            (d := self.view.devices.get(a)) is not None and d.driver == VFIO
            for a in lease.original_drivers
        )


def _profile(profiles: tuple[MigProfile, ...], name: str) -> MigProfile:
    return next(p for p in profiles if p.name == name)


def _replace(struct: S, **changes: Any) -> S:
    return msgspec.structs.replace(struct, **changes)


def _allocation(lease: GpuLease) -> DeviceAllocation:
    if lease.guest_type is GuestType.QEMU:
        return DeviceAllocation(lease=lease, libvirt_hostdev=libvirt_hostdev(lease))
    return DeviceAllocation(lease=lease, lxd_device=lxd_device(lease))
