"""``/nodes/{node}/qemu/{vmid}``: snapshots, pending changes, templates, clones and disk resize.

Reads (snapshot list, a snapshot's config, pending changes) come from the guest document; every
change is one typed request to the owning agent, answered with the task's UPID.
"""

from __future__ import annotations

import re
from typing import Any

from rucher.bus import RucherError
from rucher.gateway.permissions import forbidden
from rucher.gateway.routes.qemu import _record, _task
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord
from rucher.pve.params import ParamError

ROUTES = RouteTable()

SNAPSHOT_KEYS = ("snaptime", "description", "vmstate", "parent", "snapstate")
SIZE = re.compile(r"^(?P<plus>\+)?(?P<number>\d+(\.\d+)?)(?P<unit>[KMGT])?$")
UNITS = {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _section(record: GuestRecord, snapname: str) -> dict[str, str]:
    section = record.snapshots.get(snapname)
    if section is None:
        raise ParamError({"snapname": f"snapshot '{snapname}' does not exist"})
    return section


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/snapshot")
async def list_snapshots(call: Call) -> list[dict[str, Any]]:
    """Every snapshot with its parent, then ``current`` ("You are here!")."""
    record = await _record(call)
    state = call.gateway.model.guest_state.get(record.vmid)
    running = state is not None and state is not PowerState.STOPPED
    entries: list[dict[str, Any]] = []
    for name, section in sorted(record.snapshots.items()):
        entry: dict[str, Any] = {
            "name": name,
            "description": section.get("description", ""),
            "snaptime": int(section.get("snaptime", "0") or 0),
            "vmstate": 1 if section.get("vmstate") == "1" else 0,
        }
        if "parent" in section:
            entry["parent"] = section["parent"]
        entries.append(entry)
    current: dict[str, Any] = {
        "name": "current",
        "description": "You are here!",
        "digest": record.digest,
        "running": 1 if running else 0,
    }
    if "parent" in record.config:
        current["parent"] = record.config["parent"]
    entries.append(current)
    return entries


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/snapshot")
async def create_snapshot(call: Call) -> str:
    """Snapshot the VM (with its RAM when ``vmstate`` and it runs)."""
    p = call.params
    await _record(call)
    command = call.command(
        compute.VmSnapshotCreate,
        vmid=p["vmid"],
        user=call.authid,
        snapname=p["snapname"],
        description=p["description"],
        vmstate=p["vmstate"],
    )
    return await _task(call, compute.SNAPSHOT_CREATE, command)


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}")
async def snapshot_index(call: Call) -> list[dict[str, str]]:
    """The snapshot's sub-resources."""
    _section(await _record(call), call.params["snapname"])
    return [{"cmd": "rollback"}, {"cmd": "config"}]


@ROUTES("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}")
async def delete_snapshot(call: Call) -> str:
    """Delete the snapshot (``force`` drops its section even if a disk refuses)."""
    p = call.params
    await _record(call)
    command = call.command(
        compute.VmSnapshotDelete,
        vmid=p["vmid"],
        user=call.authid,
        snapname=p["snapname"],
        force=p["force"],
    )
    return await _task(call, compute.SNAPSHOT_DELETE, command)


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config")
async def snapshot_config(call: Call) -> dict[str, Any]:
    """The config the VM had when the snapshot was taken, with its description and time."""
    section = _section(await _record(call), call.params["snapname"])
    config: dict[str, Any] = dict(section)
    if "snaptime" in config:
        config["snaptime"] = int(config["snaptime"])
    return config


@ROUTES("PUT", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config")
async def update_snapshot_config(call: Call) -> None:
    """Change a snapshot's description."""
    p = call.params
    _section(await _record(call), p["snapname"])
    if p["description"] is None:
        return
    command = call.command(
        compute.VmSnapshotUpdate,
        vmid=p["vmid"],
        user=call.authid,
        snapname=p["snapname"],
        description=p["description"],
    )
    await call.ask(compute.SNAPSHOT_UPDATE.to(node=p["node"]), command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback")
async def rollback_snapshot(call: Call) -> str:
    """Roll the VM back to the snapshot; ``start`` it afterwards."""
    p = call.params
    await _record(call)
    command = call.command(
        compute.VmSnapshotRollback,
        vmid=p["vmid"],
        user=call.authid,
        snapname=p["snapname"],
        start=p["start"],
    )
    return await _task(call, compute.SNAPSHOT_ROLLBACK, command)


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/pending")
async def pending_changes(call: Call) -> list[dict[str, Any]]:
    """Every config key with its current value, its pending value and pending deletion."""
    record = await _record(call)
    entries: list[dict[str, Any]] = []
    for key in sorted({*record.config, *record.pending, *record.pending_delete}):
        entry: dict[str, Any] = {"key": key}
        if key in record.config:
            entry["value"] = record.config[key]
        if key in record.pending:
            entry["pending"] = record.pending[key]
        if key in record.pending_delete:
            entry["delete"] = 1
        entries.append(entry)
    entries.append({"key": "digest", "value": record.digest})
    return entries


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/template")
async def create_template(call: Call) -> str:
    """Turn the stopped VM into a template."""
    p = call.params
    await _record(call)
    command = call.command(compute.VmTemplate, vmid=p["vmid"], user=call.authid, disk=p["disk"])
    return await _task(call, compute.GUEST_TEMPLATE, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/clone")
async def clone_vm(call: Call) -> str:
    """Clone the VM or template into ``newid`` (linked from a template unless ``full``)."""
    p = call.params
    newid, pool = p["newid"], p["pool"]
    allowed = call.allowed(f"/vms/{newid}", ["VM.Allocate"]) or (
        pool is not None and call.allowed(f"/pool/{pool}", ["VM.Allocate"])
    )
    if not allowed:
        raise forbidden(f"Permission check failed (/vms/{newid}, VM.Allocate)")
    await _record(call)
    command = call.command(
        compute.VmClone,
        vmid=p["vmid"],
        user=call.authid,
        newid=newid,
        full=p["full"],
        target=p["target"],
        storage=p["storage"],
        format=p["format"],
        name=p["name"],
        description=p["description"],
        pool=pool,
        snapname=p["snapname"],
        bwlimit=p["bwlimit"],
    )
    return await _task(call, compute.GUEST_CLONE, command)


def parse_size(text: str) -> tuple[int, bool]:
    """``+1G`` (grow by) or ``10G`` (grow to) in bytes, and whether it is relative."""
    found = SIZE.match(text.strip())
    if found is None:
        raise ParamError({"size": f"value '{text}' does not look like a valid disk size"})
    size = int(float(found["number"]) * UNITS[found["unit"]])
    return size, found["plus"] is not None


@ROUTES("PUT", "/nodes/{node}/qemu/{vmid}/resize")
async def resize_disk(call: Call) -> str:
    """Grow a disk by ``+SIZE`` or to ``SIZE``; shrinking is refused."""
    p = call.params
    size, relative = parse_size(str(p["size"]))
    await _record(call)
    command = call.command(
        compute.VmDiskResize,
        vmid=p["vmid"],
        user=call.authid,
        disk=p["disk"],
        size=size,
        relative=relative,
        digest=p["digest"],
        skiplock=p["skiplock"],
    )
    try:
        return await _task(call, compute.DISK_RESIZE, command)
    except RucherError as err:
        if err.code is ErrorCode.NOT_FOUND and err.details.get("field") == "disk":
            raise ParamError({"disk": err.message}) from err
        raise
