"""Disk definitions for the hypervisors: libvirt ``<disk>`` elements and LXD disk devices."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from rucher.proto.storage import (
    ContentType,
    DiskFormat,
    StorageDefinition,
    VolumeMapping,
    VolumeProtocol,
)


def _text(element: ET.Element) -> str:
    return ET.tostring(element, encoding="unicode")


def file_mapping(volid: str, path: str, fmt: str, content: ContentType) -> VolumeMapping:
    """A volume the hypervisor opens as a file (or a folder, for a container's subvolume)."""
    if fmt == DiskFormat.SUBVOL.value:
        return VolumeMapping(
            volid=volid,
            protocol=VolumeProtocol.FILE,
            path=path,
            format=DiskFormat.SUBVOL,
            libvirt_source="",
            lxd_device={"type": "disk", "source": path, "path": "/"},
        )
    disk_format = DiskFormat(fmt) if fmt in DiskFormat.__members__.values() else DiskFormat.RAW
    cdrom = content is ContentType.ISO
    disk = ET.Element("disk", type="file", device="cdrom" if cdrom else "disk")
    ET.SubElement(disk, "driver", name="qemu", type=disk_format.value)
    source = ET.SubElement(disk, "source", file=path)
    if cdrom:
        ET.SubElement(disk, "readonly")
    return VolumeMapping(
        volid=volid,
        protocol=VolumeProtocol.FILE,
        path=path,
        format=disk_format,
        libvirt_source=_text(source),
        libvirt_disk=_text(disk),
        lxd_device={"type": "disk", "source": path},
    )


def monitor_hosts(monhost: tuple[str, ...]) -> list[tuple[str, str]]:
    """(address, port or "") of each monitor, from Proxmox ``monhost`` or Ceph ``mon_host``.

    Accepts ``10.0.0.1``, ``10.0.0.1:6789``, ``[v2:10.0.0.1:3300]`` and
    ``[v2:10.0.0.1:3300,v1:10.0.0.1:6789]`` (v2 preferred), separated by spaces, commas or ``;``.
    """
    hosts: list[tuple[str, str]] = []
    for entry in monhost:
        for group in entry.replace(";", " ").split():
            addresses = [a for a in group.strip("[]").split(",") if a]
            if not addresses:
                continue
            chosen = next((a for a in addresses if a.startswith("v2:")), addresses[0])
            address = chosen.removeprefix("v2:").removeprefix("v1:")
            host, port = address, ""
            if address.count(":") == 1:  # more colons: an IPv6 address without a port
                host, _, port = address.rpartition(":")
            hosts.append((host, port))
    return hosts


def rbd_mapping(
    volid: str, definition: StorageDefinition, image: str, username: str, secret: str
) -> VolumeMapping:
    """An RBD image QEMU reaches through librbd, authenticated with a libvirt ``ceph`` secret."""
    pool = definition.pool or "rbd"
    spec = f"{pool}/{image}"
    usage = f"rucher-ceph-{definition.storage}"
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="writeback", discard="unmap")
    auth = ET.SubElement(disk, "auth", username=username)
    ET.SubElement(auth, "secret", type="ceph", usage=usage)
    source = ET.SubElement(disk, "source", protocol="rbd", name=spec)
    for host, port in monitor_hosts(definition.monhost):
        ET.SubElement(source, "host", {"name": host, **({"port": port} if port else {})})
    return VolumeMapping(
        volid=volid,
        protocol=VolumeProtocol.RBD,
        path=spec,
        format=DiskFormat.RAW,
        libvirt_source=_text(source),
        libvirt_disk=_text(disk),
        lxd_device={"type": "disk", "pool": pool, "source": image},
        username=username,
        secret=secret,
        secret_usage=usage,
    )
