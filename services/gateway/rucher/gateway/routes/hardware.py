"""``/nodes/{node}/hardware``: the node's PCI devices and their mdev types, from its GPU broker."""

from __future__ import annotations

import re
from typing import Any

from rucher.bus import RucherError
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import gpu
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import PciDevice
from rucher.pve.values import split_list

ROUTES = RouteTable()

_SHORT_ID = re.compile(r"^[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-9a-fA-F]$")
_FULL_ID = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-9a-fA-F]$")


async def _devices(call: Call) -> tuple[PciDevice, ...]:
    listing = await call.ask(gpu.PCI_LIST.to(node=call.params["node"]), gpu.PciListQuery())
    return listing.devices


def _entry(device: PciDevice, verbose: bool) -> dict[str, Any]:
    """One device as ``pvesh get /nodes/{node}/hardware/pci`` shows it."""
    entry: dict[str, Any] = {
        "id": device.address,
        "class": f"0x{device.class_code}",
        "vendor": f"0x{device.vendor_id}",
        "device": f"0x{device.device_id}",
        "iommugroup": device.iommu_group if device.iommu_group is not None else -1,
    }
    if device.subsystem_vendor_id is not None:
        entry["subsystem_vendor"] = f"0x{device.subsystem_vendor_id}"
    if device.subsystem_device_id is not None:
        entry["subsystem_device"] = f"0x{device.subsystem_device_id}"
    if device.mdev_types:
        entry["mdev"] = 1
    if verbose:
        if device.vendor_name:
            entry["vendor_name"] = device.vendor_name
        if device.device_name:
            entry["device_name"] = device.device_name
    return entry


@ROUTES("GET", "/nodes/{node}/hardware")
async def hardware_index(call: Call) -> list[dict[str, Any]]:
    """The hardware types Rucher lists."""
    return [{"type": "pci"}]


@ROUTES("GET", "/nodes/{node}/hardware/pci")
async def list_pci(call: Call) -> list[dict[str, Any]]:
    """Every PCI function of the node but the blacklisted classes (bridges etc. by default)."""
    blacklist = [
        c.lower() for c in split_list((call.params["pci-class-blacklist"] or "").replace(";", ","))
    ]
    verbose = bool(call.params["verbose"])
    return [
        _entry(device, verbose)
        for device in await _devices(call)
        if not any(device.class_code.startswith(prefix) for prefix in blacklist if prefix)
    ]


@ROUTES("GET", "/nodes/{node}/hardware/pci/{pci-id-or-mapping}")
async def pci_index(call: Call) -> list[dict[str, Any]]:
    """What can be listed for one device."""
    return [{"method": "mdev"}]


async def _address(call: Call) -> str:
    """The device the path names: a PCI id (domain optional) or a mapping's entry here."""
    wanted = str(call.params["pci-id-or-mapping"])
    if _FULL_ID.match(wanted):
        return wanted.lower()
    if _SHORT_ID.match(wanted):
        return f"0000:{wanted.lower()}"
    listing = await call.ask(gpu.MAPPING_LIST.address, gpu.MappingListQuery(id=wanted))
    node = call.params["node"]
    for state in listing.mappings:
        for entry in state.mapping.map:
            if entry.node == node:
                return entry.path
    raise RucherError(
        ErrorCode.NOT_FOUND,
        f"PCI mapping '{wanted}' has no device on node '{node}'",
        details={"field": "pci-id-or-mapping"},
    )


@ROUTES("GET", "/nodes/{node}/hardware/pci/{pci-id-or-mapping}/mdev")
async def list_mdev_types(call: Call) -> list[dict[str, Any]]:
    """The mediated-device types a device offers, with how many instances are left."""
    address = await _address(call)
    for device in await _devices(call):
        if device.address == address:
            return [
                {
                    "type": kind.type_id,
                    "available": kind.available_instances,
                    "description": kind.description,
                    "name": kind.name,
                }
                for kind in device.mdev_types
            ]
    raise RucherError(
        ErrorCode.NOT_FOUND,
        f"node '{call.params['node']}' has no PCI device {address}",
        details={"field": "pci-id-or-mapping"},
    )
