"""What an agent needs to attach a leased device: libvirt ``<hostdev>`` XML or an LXD device."""

from __future__ import annotations

from rucher.proto.gpu import GpuKind, GpuLease


def pci_hostdev(address: str) -> str:
    """A ``<hostdev>`` for a PCI function the broker already bound to vfio-pci."""
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    return (
        "<hostdev mode='subsystem' type='pci' managed='no'>"
        "<driver name='vfio'/><source>"
        f"<address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
        "</source></hostdev>"
    )


def mdev_hostdev(uuid: str) -> str:
    """A ``<hostdev>`` for a mediated device (vGPU); ``uuid`` is one the broker made."""
    return (
        "<hostdev mode='subsystem' type='mdev' model='vfio-pci' managed='no'>"
        f"<source><address uuid='{uuid}'/></source></hostdev>"
    )


def libvirt_hostdev(lease: GpuLease) -> str | None:
    """The domain XML of a VM's lease: one ``<hostdev>`` per function handed over."""
    if lease.kind is GpuKind.MDEV and lease.mdev_uuid is not None:
        return mdev_hostdev(lease.mdev_uuid)
    if lease.kind in (GpuKind.PASSTHROUGH, GpuKind.VF):
        others = sorted(a for a in lease.original_drivers if a != lease.address)
        return "".join(pci_hostdev(a) for a in [lease.address, *others])
    return None


def lxd_device(lease: GpuLease) -> dict[str, str]:
    """The LXD device config of a container's lease (a whole GPU, a VF or a MIG slice)."""
    if lease.kind is GpuKind.MIG and lease.mig_instance is not None:
        instance = lease.mig_instance
        return {
            "type": "gpu",
            "gputype": "mig",
            "pci": lease.address,
            "mig.gi": str(instance.gpu_instance_id),
            "mig.ci": str(instance.compute_instance_id or 0),
        }
    return {"type": "gpu", "gputype": "physical", "pci": lease.address}
