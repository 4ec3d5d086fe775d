"""Which device a request may take, and why a device cannot be handed out: pure checks.

The broker's view of the node is a :class:`NodeView`: every PCI function as discovered, the
leases, and the mediated devices that exist. Each check returns a readable reason or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rucher.gpu.host import VFIO, Mdev
from rucher.proto.gpu import GpuLease, PciDevice

BRIDGE_CLASS = "06"


@dataclass
class NodeView:
    """The node's devices, leases and mediated devices, as last read."""

    devices: dict[str, PciDevice] = field(default_factory=dict)
    leases: dict[str, GpuLease] = field(default_factory=dict)
    mdevs: list[Mdev] = field(default_factory=list)
    driver_version: str | None = None

    def holder(self, address: str) -> GpuLease | None:
        """The lease holding a whole function (passthrough, VF, or bound with a group)."""
        for lease in self.leases.values():
            if lease.address == address and lease.mig_instance is None and not lease.mdev_uuid:
                return lease
            if address in lease.original_drivers:
                return lease
        return None

    def users(self, address: str) -> list[GpuLease]:
        """Every lease on a function: whole, mdev or MIG."""
        return [
            lease
            for lease in self.leases.values()
            if lease.address == address or address in lease.original_drivers
        ]

    def mdevs_on(self, address: str) -> list[Mdev]:
        """The mediated devices whose parent is ``address``."""
        return [mdev for mdev in self.mdevs if mdev.parent == address]


def slot_of(address: str) -> str:
    """``0000:41:00`` for ``0000:41:00.1``: the functions of one physical device."""
    return address.rpartition(".")[0]


def describe(lease: GpuLease) -> str:
    """``VM 100 (hostpci0)``."""
    return f"{'CT' if lease.guest_type.value == 'lxc' else 'VM'} {lease.vmid} ({lease.slot})"


def busy_reason(view: NodeView, device: PciDevice) -> str | None:
    """Why ``device`` is in use (leased whole, mdevs, MIG instances), or None."""
    holder = view.holder(device.address)
    if holder is not None:
        return f"{device.address} is leased to {describe(holder)}"
    mdevs = view.mdevs_on(device.address)
    if mdevs:
        return f"{device.address} has {len(mdevs)} mediated device(s) in use"
    if device.mig_instances:
        return f"{device.address} has {len(device.mig_instances)} MIG instance(s)"
    return None


def group_functions(view: NodeView, device: PciDevice) -> tuple[list[str], str | None]:
    """The functions a passthrough of ``device`` binds to vfio-pci, or the reason it cannot.

    The whole IOMMU group goes to the guest: every function in it except bridges must be free,
    and a function of another device still used by the host (bound to a host driver) makes the
    group incomplete for a passthrough.
    """
    if device.iommu_group is None:
        return [], f"{device.address} is in no IOMMU group (is the IOMMU enabled?)"
    functions = []
    for address in device.iommu_group_members or (device.address,):
        member = view.devices.get(address)
        if member is None:
            return [], f"IOMMU group {device.iommu_group} member {address} is not readable"
        if member.class_code.startswith(BRIDGE_CLASS):
            continue
        reason = busy_reason(view, member)
        if reason is not None:
            return [], f"IOMMU group {device.iommu_group}: {reason}"
        same_device = slot_of(address) == slot_of(device.address)
        if not same_device and member.driver not in (None, VFIO):
            return [], (
                f"IOMMU group {device.iommu_group} also holds {address} (driver "
                f"{member.driver}), which the host uses: the group is not whole"
            )
        functions.append(address)
    return sorted(functions, key=lambda a: (a != device.address, a)), None


def is_gpu(device: PciDevice) -> bool:
    """A display controller (class 03xx) that is a physical function."""
    return device.class_code.startswith("03") and device.physfn is None


def of_interest(device: PciDevice, mapped: set[str]) -> bool:
    """Whether the inventory shows ``device``: GPUs, vGPU parents, SR-IOV, VFIO and mapped."""
    return (
        device.class_code.startswith("03")
        or bool(device.mdev_types)
        or device.sriov_totalvfs > 0
        or device.physfn is not None
        or device.driver == VFIO
        or device.address in mapped
    )
