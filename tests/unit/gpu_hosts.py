"""Fake GPU hosts for the broker's tests: the real H200 host, and synthetic ones beside it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rucher.gpu.drivers.fake import FakeGpu, FakeKernel, FakeNvml
from rucher.gpu.host import Host
from rucher.gpu.service import GpuBroker
from rucher.gpu.store import MemoryLeaseStore
from rucher.proto.gpu import GpuInventory, GpuLease, PciMapping, ReleaseReason

from .test_placement_mig import H200, h200_profiles

NODE = "n1"
NVIDIA, H200_ID, L40S = "10de", "2335", "26b9"


def h200_sysfs() -> dict[str, dict[str, Any]]:
    """The captured host's PCI functions (``pci-sysfs.json``)."""
    return json.loads((H200 / "pci-sysfs.json").read_text())


def h200_nvml() -> dict[str, Any]:
    """The captured host's NVML values (``nvml.json``)."""
    return json.loads((H200 / "nvml.json").read_text())


def record(
    vendor: str,
    device: str,
    cls: str,
    driver: str | None,
    group: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """A PCI function shaped like a ``pci-sysfs.json`` entry."""
    return {
        "vendor": f"0x{vendor}",
        "device": f"0x{device}",
        "class": f"0x{cls}",
        "driver": driver,
        "iommu_group": group,
        "numa_node": "0",
        "reset_method": "flr bus",
        "subsystem_vendor": f"0x{vendor}",
        "subsystem_device": "0x1234",
        "mdev_supported_types": {},
        "physfn": None,
        "sriov_totalvfs": None,
        "sriov_numvfs": None,
        **extra,
    }


def gpu_record(group: int | None, **extra: Any) -> dict[str, Any]:
    """An NVIDIA L40S bound to the nvidia driver."""
    return record(NVIDIA, L40S, "030000", "nvidia", group, **extra)


def vgpu_types(available: int) -> dict[str, Any]:
    """Two vGPU types as the NVIDIA vGPU host driver lists them."""
    return {
        "nvidia-1155": {
            "name": "NVIDIA L40S-12Q",
            "available_instances": available,
            "device_api": "vfio-pci",
            "description": "num_heads=4, frl_config=60, framebuffer=12288M",
        },
        "nvidia-1156": {
            "name": "NVIDIA L40S-24Q",
            "available_instances": max(available // 2, 0),
            "device_api": "vfio-pci",
            "description": "num_heads=4, frl_config=60, framebuffer=24576M",
        },
    }


@dataclass
class Guests:
    """The guests the cluster store places on the node."""

    vmids: set[int] = field(default_factory=set)

    async def on_node(self) -> set[int]:
        """VMIDs on the node."""
        return set(self.vmids)


@dataclass
class Mappings:
    """PCI mappings held in memory."""

    items: dict[str, PciMapping] = field(default_factory=dict)

    async def mapping(self, mapping_id: str) -> PciMapping | None:
        """One mapping."""
        return self.items.get(mapping_id)

    async def all(self) -> list[PciMapping]:
        """Every mapping."""
        return list(self.items.values())


@dataclass
class Events:
    """The events a broker published."""

    inventories: list[GpuInventory] = field(default_factory=list)
    made: list[GpuLease] = field(default_factory=list)
    ended: list[tuple[str, ReleaseReason]] = field(default_factory=list)

    async def inventory(self, inventory: GpuInventory) -> None:
        """Keep an inventory."""
        self.inventories.append(inventory)

    async def allocated(self, lease: GpuLease) -> None:
        """Keep an allocation."""
        self.made.append(lease)

    async def released(self, lease: GpuLease, reason: ReleaseReason) -> None:
        """Keep a release."""
        self.ended.append((lease.lease_id, reason))


@dataclass
class FakeNode:
    """A fake host, and what a broker on it is built from (kept across a broker restart)."""

    kernel: FakeKernel
    nvml: FakeNvml | None
    store: MemoryLeaseStore = field(default_factory=MemoryLeaseStore)
    guests: Guests = field(default_factory=Guests)
    mappings: Mappings = field(default_factory=Mappings)
    events: Events = field(default_factory=Events)
    now: float = 1000.0

    def broker(self) -> GpuBroker:
        """A broker process on this host (a new one models a restart)."""
        return GpuBroker(
            NODE,
            Host(self.kernel, self.nvml),
            self.store,
            self.events,
            self.mappings,
            self.guests,
            clock=lambda: self.now,
            release_grace=60.0,
        )


def h200_node(root: Path, *, gpus: int = 1, mig: bool = True) -> FakeNode:
    """The captured H200 host; with ``gpus`` > 1, copies of its GPU on further buses."""
    devices = h200_sysfs()
    gpu = devices["0000:00:06.0"]
    nvml = h200_nvml()["gpus"][0]
    fakes = []
    for index in range(gpus):
        address = "0000:00:06.0" if index == 0 else f"0000:{0x40 + index:02x}:00.0"
        devices[address] = dict(gpu)
        fakes.append(
            FakeGpu(
                address=address,
                name=nvml["name"],
                uuid=nvml["uuid"] if index == 0 else f"GPU-0000000{index}-fake",
                memory=nvml["memory_total"],
                mig=mig,
                profiles=h200_profiles(),
            )
        )
    kernel = FakeKernel(root / "sys", devices)
    return FakeNode(kernel=kernel, nvml=FakeNvml(kernel, fakes))


def synthetic_node(root: Path) -> FakeNode:
    """A host with what the H200 lacks: IOMMU groups, an incomplete one, vGPU types, SR-IOV.

    - 0000:41:00.0 GPU + 0000:41:00.1 its audio function, IOMMU group 20, behind bridge
      0000:40:01.0 in the same group;
    - 0000:42:00.0 GPU sharing group 21 with the host's NIC 0000:05:00.0 (incomplete group);
    - 0000:43:00.0 GPU offering vGPU types (group 22);
    - 0000:44:00.0 SR-IOV GPU with two VFs 0000:44:00.4 and 0000:44:00.5 (groups 24, 25);
    - 0000:45:00.0 GPU already bound to vfio-pci at boot (group 26).
    """
    devices = {
        "0000:40:01.0": record("1022", "1483", "060400", "pcieport", 20),
        "0000:41:00.0": gpu_record(20),
        "0000:41:00.1": record(NVIDIA, "22ba", "040300", "snd_hda_intel", 20),
        "0000:42:00.0": gpu_record(21),
        "0000:05:00.0": record("8086", "1533", "020000", "igb", 21),
        "0000:43:00.0": gpu_record(22, mdev_supported_types=vgpu_types(4)),
        "0000:44:00.0": gpu_record(23, sriov_totalvfs=4, sriov_numvfs=2),
        "0000:44:00.4": gpu_record(24, physfn="0000:44:00.0"),
        "0000:44:00.5": gpu_record(25, physfn="0000:44:00.0"),
        "0000:45:00.0": record(NVIDIA, L40S, "030000", "vfio-pci", 26),
    }
    return FakeNode(kernel=FakeKernel(root / "sys", devices), nvml=None)
