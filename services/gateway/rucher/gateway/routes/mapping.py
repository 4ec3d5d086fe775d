"""``/cluster/mapping/pci``: cluster-wide PCI resource mappings, kept by the GPU brokers.

Each entry is visible to callers holding Mapping.Audit, Mapping.Use or Mapping.Modify on
``/mapping/pci/{id}``, as in Proxmox; a node entry is the property string Proxmox writes
(``node=n1,path=0000:41:00.0,id=10de:26b9,iommugroup=20``).
"""

from __future__ import annotations

from typing import Any

from rucher.gateway.routing import Call, RouteTable
from rucher.proto import gpu
from rucher.proto.gpu import PciMappingEntry, PciMappingState

ROUTES = RouteTable()

VISIBLE = ("Mapping.Audit", "Mapping.Use", "Mapping.Modify")


def map_entry(entry: PciMappingEntry) -> str:
    """A node entry as Proxmox's ``map`` property string."""
    parts = [f"node={entry.node}", f"path={entry.path}", f"id={entry.vendor_id}:{entry.device_id}"]
    if entry.subsystem_vendor_id and entry.subsystem_device_id:
        parts.append(f"subsystem-id={entry.subsystem_vendor_id}:{entry.subsystem_device_id}")
    if entry.iommu_group is not None:
        parts.append(f"iommugroup={entry.iommu_group}")
    if entry.description:
        parts.append(f"description={entry.description}")
    return ",".join(parts)


def _config(state: PciMappingState) -> dict[str, Any]:
    mapping = state.mapping
    config: dict[str, Any] = {
        "id": mapping.id,
        "description": mapping.description,
        "map": [map_entry(entry) for entry in mapping.map],
        "digest": state.digest,
    }
    if mapping.mdev:
        config["mdev"] = 1
    if mapping.live_migration_capable:
        config["live-migration-capable"] = 1
    return config


async def _states(call: Call, mapping_id: str | None = None) -> tuple[PciMappingState, ...]:
    listing = await call.ask(gpu.MAPPING_LIST.address, gpu.MappingListQuery(id=mapping_id))
    return listing.mappings


async def _checks(call: Call, state: PciMappingState, node: str) -> list[dict[str, str]]:
    """Proxmox's ``check-node`` diagnostics: is the mapped device there, with the same ids."""
    entries = [entry for entry in state.mapping.map if entry.node == node]
    if not entries:
        return [{"severity": "warning", "message": f"No mapping for node '{node}'"}]
    listing = await call.ask(gpu.PCI_LIST.to(node=node), gpu.PciListQuery())
    devices = {device.address: device for device in listing.devices}
    checks = []
    for entry in entries:
        device = devices.get(entry.path)
        if device is None:
            checks.append({"severity": "error", "message": f"{entry.path} not found"})
        elif (device.vendor_id, device.device_id) != (entry.vendor_id, entry.device_id):
            checks.append({"severity": "error", "message": f"{entry.path}: vendor/device differ"})
    return checks


@ROUTES("GET", "/cluster/mapping")
async def mapping_index(call: Call) -> list[dict[str, Any]]:
    """The mapping types Rucher keeps."""
    return [{"name": "pci"}]


@ROUTES("GET", "/cluster/mapping/pci")
async def list_mappings(call: Call) -> list[dict[str, Any]]:
    """The mappings the caller may see; with ``check-node``, diagnostics for that node."""
    node = call.params["check-node"]
    listed = []
    for state in await _states(call):
        if not call.allowed(f"/mapping/pci/{state.mapping.id}", VISIBLE, any_=True):
            continue
        config = _config(state)
        if node is not None:
            config["checks"] = await _checks(call, state, str(node))
        listed.append(config)
    return listed


@ROUTES("GET", "/cluster/mapping/pci/{id}")
async def read_mapping(call: Call) -> dict[str, Any]:
    """One mapping with its digest."""
    (state,) = await _states(call, call.params["id"])
    return _config(state)


@ROUTES("DELETE", "/cluster/mapping/pci/{id}")
async def delete_mapping(call: Call) -> None:
    """Remove a mapping."""
    command = call.command(gpu.MappingDelete, id=call.params["id"], user=call.authid)
    await call.ask(gpu.MAPPING_DELETE.address, command)
