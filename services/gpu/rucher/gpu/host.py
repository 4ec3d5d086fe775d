"""The node's devices as sysfs and NVML show them, and the changes the broker makes to them.

Discovery walks ``bus/pci/devices`` (ids, class, driver, IOMMU group and its members, NUMA
node, reset methods, SR-IOV, mdev types) and adds what NVML knows about NVIDIA GPUs (UUID,
memory, MIG mode, profiles with their legal placements, existing instances, and the vGPU types
of a vGPU host driver). Every sysfs or NVML call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import structlog

from rucher.gpu.drivers.interface import Nvml, NvmlError, Sysfs
from rucher.gpu.pciids import PciNames
from rucher.proto.gpu import (
    MdevType,
    MigInstance,
    MigPlacement,
    MigProfile,
    PciDevice,
    VgpuType,
)

log = structlog.get_logger("rucher.gpu.host")

PCI = "bus/pci/devices"
DRIVERS = "bus/pci/drivers"
GROUPS = "kernel/iommu_groups"
MDEVS = "bus/mdev/devices"
VFIO = "vfio-pci"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
T = TypeVar("T")


class HostError(Exception):
    """A host change the kernel or NVML refused; the message says which and why."""


@dataclass(frozen=True)
class Mdev:
    """A mediated device that exists on the host."""

    uuid: str
    parent: str
    type_id: str


def _hex(value: str | None) -> str | None:
    if value is None or not value.startswith("0x"):
        return None
    return value[2:].lower()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def read_device(sysfs: Sysfs, address: str) -> PciDevice | None:
    """One PCI function as sysfs shows it; None if it vanished or its ids are unreadable."""
    base = f"{PCI}/{address}"
    vendor, device = _hex(sysfs.read(f"{base}/vendor")), _hex(sysfs.read(f"{base}/device"))
    class_code = _hex(sysfs.read(f"{base}/class"))
    if vendor is None or device is None or class_code is None:
        return None
    group = _int(sysfs.link(f"{base}/iommu_group"))
    members = tuple(sysfs.listdir(f"{GROUPS}/{group}/devices")) if group is not None else ()
    numa = _int(sysfs.read(f"{base}/numa_node"))
    types = []
    for type_id in sysfs.listdir(f"{base}/mdev_supported_types"):
        kind = f"{base}/mdev_supported_types/{type_id}"
        types.append(
            MdevType(
                type_id=type_id,
                name=sysfs.read(f"{kind}/name") or "",
                description=sysfs.read(f"{kind}/description") or "",
                device_api=sysfs.read(f"{kind}/device_api") or "vfio-pci",
                available_instances=_int(sysfs.read(f"{kind}/available_instances")) or 0,
            )
        )
    return PciDevice(
        address=address,
        vendor_id=vendor,
        device_id=device,
        class_code=class_code[-6:].rjust(6, "0"),
        subsystem_vendor_id=_hex(sysfs.read(f"{base}/subsystem_vendor")),
        subsystem_device_id=_hex(sysfs.read(f"{base}/subsystem_device")),
        driver=sysfs.link(f"{base}/driver"),
        iommu_group=group,
        iommu_group_members=members,
        numa_node=numa if numa is not None and numa >= 0 else None,
        reset_method=tuple((sysfs.read(f"{base}/reset_method") or "").split()),
        sriov_totalvfs=_int(sysfs.read(f"{base}/sriov_totalvfs")) or 0,
        sriov_numvfs=_int(sysfs.read(f"{base}/sriov_numvfs")) or 0,
        physfn=sysfs.link(f"{base}/physfn"),
        mdev_types=tuple(types),
    )


def discover(
    sysfs: Sysfs, nvml: Nvml | None, names: PciNames | None = None
) -> tuple[list[PciDevice], str | None]:
    """Every PCI function, with NVML's view of NVIDIA GPUs; and the NVIDIA driver version."""
    devices = {
        device.address: device
        for address in sysfs.listdir(PCI)
        if (device := read_device(sysfs, address)) is not None
    }
    if names is not None:
        names.learn({(d.vendor_id, d.device_id) for d in devices.values()})
        for address, device in devices.items():
            vendor_name, device_name = names.names(device.vendor_id, device.device_id)
            devices[address] = msgspec.structs.replace(
                device, vendor_name=vendor_name, device_name=device_name
            )
    if nvml is None:
        return list(devices.values()), None
    for gpu in nvml.gpus():
        found = devices.get(gpu.address)
        if found is None:
            continue
        profiles: list[MigProfile] = []
        instances: list[MigInstance] = []
        vgpus: list[VgpuType] = []
        try:
            vgpus = nvml.vgpu_types(gpu.address)
        except NvmlError as err:
            log.warning("vgpu_types_unreadable", address=gpu.address, error=str(err))
        if gpu.mig_current:
            try:
                profiles = nvml.mig_profiles(gpu.address)
                instances = nvml.mig_instances(gpu.address)
            except NvmlError as err:
                log.warning("mig_unreadable", address=gpu.address, error=str(err))
        devices[gpu.address] = msgspec.structs.replace(
            found,
            device_name=gpu.name,
            uuid=gpu.uuid,
            memory=gpu.memory,
            mig_enabled=gpu.mig_current,
            mig_pending=gpu.mig_pending,
            mig_profiles=tuple(profiles),
            mig_instances=tuple(instances),
            vgpu_types=tuple(vgpus),
        )
    return list(devices.values()), nvml.driver_version()


class Host:
    """The node's sysfs and NVML, called off the event loop."""

    def __init__(self, sysfs: Sysfs, nvml: Nvml | None, names: PciNames | None = None) -> None:
        self.sysfs = sysfs
        self.nvml = nvml
        self.names = names

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.to_thread(call)

    async def discover(self) -> tuple[list[PciDevice], str | None]:
        """Every PCI function and the NVIDIA driver version."""
        return await self._run(lambda: discover(self.sysfs, self.nvml, self.names))

    async def device(self, address: str) -> PciDevice | None:
        """One function as sysfs shows it now."""
        return await self._run(lambda: read_device(self.sysfs, address))

    def _write(self, path: str, value: str) -> None:
        try:
            self.sysfs.write(path, value)
        except OSError as err:
            raise HostError(f"writing {value!r} to {path}: {err.strerror or err}") from err

    # Passthrough -------------------------------------------------------------------------------

    def _bind_vfio(self, address: str) -> str:
        current = self.sysfs.link(f"{PCI}/{address}/driver")
        if current == VFIO:
            return VFIO
        self._write(f"{PCI}/{address}/driver_override", VFIO)
        try:
            if current is not None:
                self._write(f"{DRIVERS}/{current}/unbind", address)
            self._write("bus/pci/drivers_probe", address)
        except HostError:
            self._restore(address, current or "")
            raise
        bound = self.sysfs.link(f"{PCI}/{address}/driver")
        if bound != VFIO:
            self._restore(address, current or "")
            hint = " (is the vfio-pci module loaded?)" if bound is None else ""
            raise HostError(f"{address} is bound to {bound or 'no driver'}, not {VFIO}{hint}")
        return current or ""

    def _restore(self, address: str, original: str) -> None:
        self._write(f"{PCI}/{address}/driver_override", "\n")
        current = self.sysfs.link(f"{PCI}/{address}/driver")
        if current is not None and current != original:
            self._write(f"{DRIVERS}/{current}/unbind", address)
        if original and self.sysfs.link(f"{PCI}/{address}/driver") is None:
            # Straight to the driver it had: no probing, so no other driver can claim it.
            self._write(f"{DRIVERS}/{original}/bind", address)

    async def bind_vfio(self, address: str) -> str:
        """Bind a function to vfio-pci; its previous driver ("" for none)."""
        return await self._run(lambda: self._bind_vfio(address))

    async def restore_driver(self, address: str, original: str) -> None:
        """Clear the override and rebind ``original`` ("" leaves the function unbound)."""
        await self._run(lambda: self._restore(address, original))

    # Mediated devices --------------------------------------------------------------------------

    async def create_mdev(self, address: str, type_id: str, uuid: str) -> None:
        """Create the mediated device ``uuid`` of ``type_id`` on ``address``."""
        path = f"{PCI}/{address}/mdev_supported_types/{type_id}/create"
        await self._run(lambda: self._write(path, uuid))

    async def remove_mdev(self, uuid: str) -> None:
        """Remove a mediated device."""
        await self._run(lambda: self._write(f"{MDEVS}/{uuid}/remove", "1"))

    def _mdevs(self) -> list[Mdev]:
        found = []
        for name in self.sysfs.listdir(MDEVS):
            if not _UUID.match(name):
                continue
            type_id = self.sysfs.link(f"{MDEVS}/{name}/mdev_type")
            parent = next(
                (
                    address
                    for address in self.sysfs.listdir(PCI)
                    if name in self.sysfs.listdir(f"{PCI}/{address}")
                ),
                None,
            )
            if type_id is not None and parent is not None:
                found.append(Mdev(uuid=name, parent=parent, type_id=type_id))
        return found

    async def mdevs(self) -> list[Mdev]:
        """Every mediated device on the host."""
        return await self._run(self._mdevs)

    # MIG ---------------------------------------------------------------------------------------

    def _need_nvml(self) -> Nvml:
        if self.nvml is None:
            raise HostError("NVML is not available on this node (no NVIDIA driver)")
        return self.nvml

    def _create_mig(self, address: str, profile_id: int, placement: MigPlacement) -> MigInstance:
        nvml = self._need_nvml()
        try:
            gpu_instance = nvml.create_gpu_instance(address, profile_id, placement)
        except NvmlError as err:
            raise HostError(f"creating a MIG GPU instance on {address}: {err}") from err
        try:
            compute = nvml.create_compute_instance(address, gpu_instance)
        except NvmlError as err:
            nvml.destroy_gpu_instance(address, gpu_instance)
            raise HostError(f"creating a MIG compute instance on {address}: {err}") from err
        return MigInstance(
            gpu_instance_id=gpu_instance,
            profile_id=profile_id,
            placement=placement,
            compute_instance_id=compute,
        )

    async def create_mig(
        self, address: str, profile_id: int, placement: MigPlacement
    ) -> MigInstance:
        """Create a GPU instance at ``placement`` and its compute instance (both or neither)."""
        return await self._run(lambda: self._create_mig(address, profile_id, placement))

    def _destroy_mig(self, address: str, instance: MigInstance) -> None:
        nvml = self._need_nvml()
        try:
            if instance.compute_instance_id is not None:
                nvml.destroy_compute_instance(
                    address, instance.gpu_instance_id, instance.compute_instance_id
                )
            nvml.destroy_gpu_instance(address, instance.gpu_instance_id)
        except NvmlError as err:
            raise HostError(f"destroying MIG instance on {address}: {err}") from err

    async def mig_instances(self, address: str) -> list[MigInstance]:
        """The MIG instances that exist on a GPU now (none without NVML or MIG)."""
        if self.nvml is None:
            return []
        nvml = self.nvml

        def read() -> list[MigInstance]:
            try:
                return nvml.mig_instances(address)
            except NvmlError:
                return []

        return await self._run(read)

    async def destroy_mig(self, address: str, instance: MigInstance) -> None:
        """Destroy a MIG instance: its compute instance, then the GPU instance."""
        await self._run(lambda: self._destroy_mig(address, instance))
