"""A fake GPU host for tests: a real sysfs-shaped folder tree whose writes the kernel answers.

:class:`FakeKernel` is a :class:`~rucher.gpu.drivers.sysfs.HostSysfs` over a temporary folder
built from records shaped like ``shared/fixtures/gpu/h200/pci-sysfs.json``. Reads are plain file
reads; writes to the attributes the broker uses do what Linux does: ``driver_override`` then
``drivers_probe`` or ``bind`` moves the device's ``driver`` link (and refuses a device already
bound), ``unbind`` removes it, an mdev type's ``create`` makes the mediated device (refused when
no instance is left) and decrements ``available_instances``, its ``remove`` undoes that. A device
leaves its mdev types behind while bound to another driver than its own, as with a vGPU host
driver. :class:`FakeNvml` is NVML over the same host: it sees only GPUs bound to ``nvidia`` and
creates GPU instances only at legal, free placements, enforcing each profile's instance count.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rucher.gpu.drivers.interface import (
    NVML_INSUFFICIENT_RESOURCES,
    NVML_NOT_SUPPORTED,
    NvmlError,
    NvmlGpu,
)
from rucher.gpu.drivers.sysfs import HostSysfs
from rucher.proto.gpu import MigInstance, MigPlacement, MigProfile, VgpuType

PCI = "bus/pci/devices"
DRIVERS = "bus/pci/drivers"
GROUPS = "kernel/iommu_groups"
MDEVS = "bus/mdev/devices"
NULL = "(null)"
_BIND = re.compile(r"^bus/pci/drivers/([^/]+)/(bind|unbind)$")
_DEVICE_UNBIND = re.compile(r"^bus/pci/devices/([^/]+)/driver/unbind$")
_CREATE = re.compile(r"^bus/pci/devices/([^/]+)/mdev_supported_types/([^/]+)/create$")
_REMOVE = re.compile(r"^(?:bus/mdev/devices/([^/]+)|bus/pci/devices/[^/]+/([^/]+))/remove$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ATTRIBUTES = (
    "vendor",
    "device",
    "class",
    "subsystem_vendor",
    "subsystem_device",
    "numa_node",
    "reset_method",
    "sriov_totalvfs",
    "sriov_numvfs",
    "revision",
)


def _fail(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class FakeKernel(HostSysfs):
    """A sysfs tree on disk whose attribute writes behave as the kernel's."""

    def __init__(self, root: str | Path, devices: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(root)
        self.native: dict[str, str | None] = {}
        self.parked = Path(f"{self.root}.parked")
        self.writes: list[tuple[str, str]] = []
        for address, record in sorted(devices.items()):
            self._add_device(address, record)
        for address, record in devices.items():
            if record.get("physfn"):
                self._symlink(f"{PCI}/{address}/physfn", f"{PCI}/{record['physfn']}")
                pf = self.root / PCI / record["physfn"]
                index = len([n for n in os.listdir(pf) if n.startswith("virtfn")])
                self._symlink(f"{PCI}/{record['physfn']}/virtfn{index}", f"{PCI}/{address}")
        (self.root / MDEVS).mkdir(parents=True, exist_ok=True)
        (self.root / DRIVERS / "vfio-pci").mkdir(parents=True, exist_ok=True)
        (self.root / "bus/pci/drivers_probe").touch()
        for driver in os.listdir(self.root / DRIVERS):
            for name in ("bind", "unbind"):
                (self.root / DRIVERS / driver / name).touch()

    # Building ----------------------------------------------------------------------------------

    def _symlink(self, path: str, target: str) -> None:
        link = self.root / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.root / target)

    def _add_device(self, address: str, record: Mapping[str, Any]) -> None:
        folder = self.root / PCI / address
        folder.mkdir(parents=True)
        for name in ATTRIBUTES:
            if record.get(name) is not None:
                (folder / name).write_text(f"{record[name]}\n")
        (folder / "driver_override").write_text(f"{NULL}\n")
        driver = record.get("driver")
        self.native[address] = driver
        if driver:
            (self.root / DRIVERS / driver).mkdir(parents=True, exist_ok=True)
            self._symlink(f"{PCI}/{address}/driver", f"{DRIVERS}/{driver}")
            self._symlink(f"{DRIVERS}/{driver}/{address}", f"{PCI}/{address}")
        group = record.get("iommu_group")
        if group is not None:
            (self.root / GROUPS / str(group) / "devices").mkdir(parents=True, exist_ok=True)
            self._symlink(f"{PCI}/{address}/iommu_group", f"{GROUPS}/{group}")
            self._symlink(f"{GROUPS}/{group}/devices/{address}", f"{PCI}/{address}")
        for type_id, spec in (record.get("mdev_supported_types") or {}).items():
            kind = folder / "mdev_supported_types" / type_id
            (kind / "devices").mkdir(parents=True)
            for name in ("name", "description", "device_api", "available_instances"):
                if spec.get(name) is not None:
                    (kind / name).write_text(f"{spec[name]}\n")
            (kind / "create").touch()

    # The kernel's reactions --------------------------------------------------------------------

    def write(self, path: str, value: str) -> None:
        """Apply a write as the kernel would, or refuse it with the kernel's error."""
        path = path.strip("/")
        self.writes.append((path, value))
        text = value.strip()
        if path.endswith("/driver_override") and path.startswith(PCI):
            self._device(path.split("/")[3], path)
            (self.root / path).write_text(f"{text or NULL}\n")
        elif path == "bus/pci/drivers_probe":
            self._probe(text)
        elif found := _BIND.match(path):
            if found[2] == "bind":
                self._bind(text, found[1])
            else:
                self._unbind(text, found[1])
        elif found := _DEVICE_UNBIND.match(path):
            driver = self.link(f"{PCI}/{found[1]}/driver")
            if driver is None:
                raise _fail(errno.ENOENT, path)
            self._unbind(found[1], driver)
        elif found := _CREATE.match(path):
            self._create_mdev(found[1], found[2], text)
        elif found := _REMOVE.match(path):
            if text != "1":
                raise _fail(errno.EINVAL, path)
            self._remove_mdev(found[1] or found[2], path)
        elif (self.root / path).exists():
            raise _fail(errno.EACCES, path)  # a read-only attribute
        else:
            raise _fail(errno.ENOENT, path)

    def _device(self, address: str, path: str) -> Path:
        folder = self.root / PCI / address
        if not folder.is_dir():
            raise _fail(errno.ENODEV, path)
        return folder

    def _probe(self, address: str) -> None:
        self._device(address, "bus/pci/drivers_probe")
        if self.link(f"{PCI}/{address}/driver") is not None:
            return
        override = self.read(f"{PCI}/{address}/driver_override")
        wanted = override if override and override != NULL else self.native.get(address)
        if wanted and (self.root / DRIVERS / wanted).is_dir():
            self._bind(address, wanted)

    def _bind(self, address: str, driver: str) -> None:
        path = f"{DRIVERS}/{driver}/bind"
        self._device(address, path)
        if self.link(f"{PCI}/{address}/driver") is not None:
            raise _fail(errno.EBUSY, path)
        override = self.read(f"{PCI}/{address}/driver_override")
        matches = (
            override == driver
            if override and override != NULL
            else (self.native.get(address) == driver)
        )
        if not matches:
            raise _fail(errno.ENODEV, path)
        self._symlink(f"{PCI}/{address}/driver", f"{DRIVERS}/{driver}")
        self._symlink(f"{DRIVERS}/{driver}/{address}", f"{PCI}/{address}")
        parked = self.parked / address
        if driver == self.native.get(address) and parked.is_dir():
            shutil.move(parked, self.root / PCI / address / "mdev_supported_types")

    def _unbind(self, address: str, driver: str) -> None:
        path = f"{DRIVERS}/{driver}/unbind"
        folder = self._device(address, path)
        if self.link(f"{PCI}/{address}/driver") != driver:
            raise _fail(errno.ENODEV, path)
        if self._mdevs_of(address):
            raise _fail(errno.EBUSY, path)  # the parent still has mediated devices
        (folder / "driver").unlink()
        (self.root / DRIVERS / driver / address).unlink()
        types = folder / "mdev_supported_types"
        if types.is_dir():
            self.parked.mkdir(parents=True, exist_ok=True)
            shutil.move(types, self.parked / address)

    def _mdevs_of(self, address: str) -> list[str]:
        return [name for name in self.listdir(f"{PCI}/{address}") if _UUID.match(name)]

    def _create_mdev(self, address: str, type_id: str, name: str) -> None:
        kind = f"{PCI}/{address}/mdev_supported_types/{type_id}"
        if not _UUID.match(name):
            raise _fail(errno.EINVAL, f"{kind}/create")
        if (self.root / MDEVS / name).exists():
            raise _fail(errno.EEXIST, f"{kind}/create")
        available = int(self.read(f"{kind}/available_instances") or "0")
        if available <= 0:
            raise _fail(errno.EUSERS, f"{kind}/create")
        device = self.root / PCI / address / name
        device.mkdir()
        (device / "remove").touch()
        self._symlink(f"{PCI}/{address}/{name}/mdev_type", kind)
        self._symlink(f"{kind}/devices/{name}", f"{PCI}/{address}/{name}")
        self._symlink(f"{MDEVS}/{name}", f"{PCI}/{address}/{name}")
        (self.root / kind / "available_instances").write_text(f"{available - 1}\n")

    def _remove_mdev(self, name: str, path: str) -> None:
        link = self.root / MDEVS / name
        if not link.is_symlink():
            raise _fail(errno.ENODEV, path)
        device = Path(os.readlink(link))
        kind = Path(os.readlink(device / "mdev_type"))
        shutil.rmtree(device)
        link.unlink()
        (kind / "devices" / name).unlink()
        available = int((kind / "available_instances").read_text())
        (kind / "available_instances").write_text(f"{available + 1}\n")

    # Test conveniences -------------------------------------------------------------------------

    def driver(self, address: str) -> str | None:
        """The driver a device is bound to now."""
        return self.link(f"{PCI}/{address}/driver")

    def mdevs(self) -> list[str]:
        """Every mediated device that exists."""
        return self.listdir(MDEVS)


@dataclass
class FakeGpu:
    """One GPU as the fake NVML holds it: identity, MIG mode, profiles and instances."""

    address: str
    name: str
    uuid: str
    memory: int
    mig: bool
    profiles: tuple[MigProfile, ...] = ()
    instances: dict[int, tuple[int, MigPlacement, list[int]]] = field(default_factory=dict)
    vgpu_types: tuple[VgpuType, ...] = ()


class FakeNvml:
    """NVML over a fake host: GPUs bound to ``nvidia``, MIG instances at legal placements."""

    def __init__(self, kernel: FakeKernel, gpus: list[FakeGpu], *, driver: str = "580.159.04"):
        self.kernel = kernel
        self.table = {gpu.address: gpu for gpu in gpus}
        self.version = driver
        self.calls: list[str] = []

    def _gpu(self, address: str) -> FakeGpu:
        gpu = self.table.get(address)
        if gpu is None or self.kernel.driver(address) != "nvidia":
            raise NvmlError(2, f"no GPU at {address}")
        return gpu

    def driver_version(self) -> str:
        """The driver version."""
        return self.version

    def gpus(self) -> list[NvmlGpu]:
        """GPUs bound to the NVIDIA driver."""
        return [
            NvmlGpu(gpu.address, gpu.name, gpu.uuid, gpu.memory, gpu.mig, gpu.mig)
            for address, gpu in sorted(self.table.items())
            if self.kernel.driver(address) == "nvidia"
        ]

    def mig_profiles(self, address: str) -> list[MigProfile]:
        """The profiles, when the GPU supports MIG."""
        return list(self._gpu(address).profiles)

    def mig_instances(self, address: str) -> list[MigInstance]:
        """The GPU instances that exist."""
        gpu = self._gpu(address)
        return [
            MigInstance(
                gpu_instance_id=gi,
                profile_id=profile,
                placement=placement,
                compute_instance_id=computes[0] if computes else None,
            )
            for gi, (profile, placement, computes) in sorted(gpu.instances.items())
        ]

    def vgpu_types(self, address: str) -> list[VgpuType]:
        """The vGPU types of a GPU under the vGPU host driver (none otherwise)."""
        return list(self._gpu(address).vgpu_types)

    def create_gpu_instance(self, address: str, profile_id: int, placement: MigPlacement) -> int:
        """Create a GPU instance, refusing illegal, taken or exhausted placements."""
        self.calls.append(f"create_gpu_instance {address} {profile_id} {placement.start}")
        gpu = self._gpu(address)
        if not gpu.mig:
            raise NvmlError(NVML_NOT_SUPPORTED, "MIG mode is disabled")
        profile = next((p for p in gpu.profiles if p.profile_id == profile_id), None)
        if profile is None or placement not in profile.placements:
            raise NvmlError(2, "invalid argument: no such profile placement")
        same = sum(1 for p, _, _ in gpu.instances.values() if p == profile_id)
        taken = {
            slot
            for _, where, _ in gpu.instances.values()
            for slot in range(where.start, where.start + where.size)
        }
        wanted = set(range(placement.start, placement.start + placement.size))
        if same >= profile.max_instances or taken & wanted:
            raise NvmlError(NVML_INSUFFICIENT_RESOURCES, "insufficient resources")
        gi = max(gpu.instances, default=0) + 1
        gpu.instances[gi] = (profile_id, placement, [])
        return gi

    def create_compute_instance(self, address: str, gpu_instance: int) -> int:
        """Create the whole-GPU-instance compute instance."""
        gpu = self._gpu(address)
        if gpu_instance not in gpu.instances:
            raise NvmlError(2, "no such GPU instance")
        computes = gpu.instances[gpu_instance][2]
        if computes:
            raise NvmlError(NVML_INSUFFICIENT_RESOURCES, "the GPU instance is fully used")
        computes.append(0)
        return 0

    def destroy_compute_instance(self, address: str, gpu_instance: int, compute: int) -> None:
        """Destroy a compute instance."""
        computes = self._gpu(address).instances.get(gpu_instance, (0, None, []))[2]
        if compute not in computes:
            raise NvmlError(2, "no such compute instance")
        computes.remove(compute)

    def destroy_gpu_instance(self, address: str, gpu_instance: int) -> None:
        """Destroy a GPU instance that has no compute instance left."""
        gpu = self._gpu(address)
        if gpu_instance not in gpu.instances:
            raise NvmlError(2, "no such GPU instance")
        if gpu.instances[gpu_instance][2]:
            raise NvmlError(19, "in use by a compute instance")  # NVML_ERROR_IN_USE
        del gpu.instances[gpu_instance]


def new_uuid() -> str:
    """A fresh mdev UUID."""
    return str(uuid.uuid4())
