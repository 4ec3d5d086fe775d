"""``/cluster/mapping/pci``: cluster-wide PCI resource mappings, kept by the GPU brokers.

Each entry is visible to callers holding Mapping.Audit, Mapping.Use or Mapping.Modify on
``/mapping/pci/{id}``, as in Proxmox; a node entry is the property string Proxmox writes
(``node=n1,path=0000:41:00.0,id=10de:26b9,iommugroup=20``).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from rucher.gateway.routing import Call, RouteTable
from rucher.proto import gpu
from rucher.proto.gpu import PciMapping, PciMappingEntry, PciMappingState
from rucher.pve import propstring
from rucher.pve.params import ParamError
from rucher.pve.values import split_list

ROUTES = RouteTable()

VISIBLE = ("Mapping.Audit", "Mapping.Use", "Mapping.Modify")
# Options PUT may reset with ``delete``, by their PciMapping field.
DELETABLE = {
    "description": "description",
    "mdev": "mdev",
    "live-migration-capable": "live_migration_capable",
}
_WHOLE_DEVICE = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}$")


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


def _entry_of(call: Call, text: str) -> PciMappingEntry:
    """One ``map`` item as a typed entry; a path without function maps its function 0."""
    endpoint = call.gateway.schema.by_key[("POST", "/cluster/mapping/pci")]
    items = endpoint.parameters.properties["map"].items
    fmt = items.format if items is not None and isinstance(items.format, dict) else {}
    try:
        values = propstring.parse(text, fmt)
    except propstring.PropertyStringError as err:
        raise ParamError({"map": str(err)}) from err
    path = str(values["path"]).lower()
    if ";" in path:
        raise ParamError({"map": "one path per node: Rucher does not pick among several paths"})
    if _WHOLE_DEVICE.match(path):
        path += ".0"
    vendor, _, device = str(values["id"]).lower().partition(":")
    fields: dict[str, Any] = {
        "node": values["node"],
        "path": path,
        "vendor_id": vendor,
        "device_id": device,
        "iommu_group": values.get("iommugroup"),
        "description": values.get("description", ""),
    }
    if "subsystem-id" in values:
        sub_vendor, _, sub_device = str(values["subsystem-id"]).lower().partition(":")
        fields.update(subsystem_vendor_id=sub_vendor, subsystem_device_id=sub_device)
    try:
        return msgspec.convert(fields, PciMappingEntry)
    except msgspec.ValidationError as err:
        raise ParamError({"map": f"{text}: {err}"}) from err


def _mapping(fields: dict[str, Any]) -> PciMapping:
    try:
        return msgspec.convert(fields, PciMapping)
    except msgspec.ValidationError as err:
        raise ParamError({"id" if "$.id" in str(err) else "map": str(err)}) from err


@ROUTES("POST", "/cluster/mapping/pci")
async def create_mapping(call: Call) -> None:
    """Add a mapping; each node's device must exist there with the ids given."""
    p = call.params
    mapping = _mapping(
        {
            "id": p["id"],
            "map": [_entry_of(call, item) for item in p["map"]],
            "description": p["description"] or "",
            "mdev": bool(p["mdev"]),
            "live_migration_capable": bool(p["live-migration-capable"]),
        }
    )
    command = call.command(gpu.MappingCreate, mapping=mapping, user=call.authid)
    await call.ask(gpu.MAPPING_CREATE.address, command)


@ROUTES("PUT", "/cluster/mapping/pci/{id}")
async def update_mapping(call: Call) -> None:
    """Change a mapping (``map`` replaces every entry; ``delete`` resets options)."""
    p = call.params
    (state,) = await _states(call, p["id"])
    fields = msgspec.to_builtins(state.mapping)
    blank = PciMapping(id=state.mapping.id, map=())
    for name in split_list(p["delete"] or ""):
        if name not in DELETABLE:
            raise ParamError({"delete": f"cannot delete option '{name}'"})
        fields[DELETABLE[name]] = getattr(blank, DELETABLE[name])
    if p["map"] is not None:
        fields["map"] = [_entry_of(call, item) for item in p["map"]]
    for name, field in DELETABLE.items():
        if p[name] is not None:
            fields[field] = p[name] if field == "description" else bool(p[name])
    command = call.command(
        gpu.MappingUpdate,
        mapping=_mapping(fields),
        digest=p["digest"] or state.digest,
        user=call.authid,
    )
    await call.ask(gpu.MAPPING_UPDATE.address, command)
