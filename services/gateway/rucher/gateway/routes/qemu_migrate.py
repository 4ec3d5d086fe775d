"""``/nodes/{node}/qemu/{vmid}/migrate``: a VM's migration preconditions, and its migration.

Both are one typed request to the agent of the node that runs the VM, which checks Proxmox's
preconditions (target, run state, local disks and devices) and runs the migration as a task.
Migration traffic goes straight between the nodes' libvirt daemons unless ``migration_type`` is
``secure``, which tunnels it through the libvirt connection.
"""

from __future__ import annotations

from typing import Any

from rucher.bus import RucherError
from rucher.gateway.routes.qemu import _record
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import compute
from rucher.proto.errors import ErrorCode

ROUTES = RouteTable()


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/migrate")
async def migrate_precondition(call: Call) -> dict[str, Any]:
    """Whether the VM runs, which nodes may take it, and its local disks and devices."""
    p = call.params
    await _record(call)
    report = await call.ask(
        compute.GUEST_MIGRATE_CHECK.to(node=p["node"]),
        call.command(compute.VmMigrateCheck, vmid=p["vmid"], target=p["target"]),
    )
    return {
        "running": report.running,
        "allowed_nodes": list(report.allowed_nodes),
        "not_allowed_nodes": {
            node: {
                "unavailable_storages": list(report.unavailable_storages.get(node, ())),
                "reason": reason,
            }
            for node, reason in report.not_allowed_nodes.items()
        },
        "local_disks": [
            {
                "volid": disk.volid,
                "size": disk.size,
                "cdrom": int(disk.cdrom),
                "is_unused": int(disk.is_unused),
            }
            for disk in report.local_disks
        ],
        "local_resources": list(report.local_resources),
        "mapped-resources": [],
        "mapped-resource-info": {},
        "has-dbus-vmstate": False,
    }


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/migrate")
async def migrate_vm(call: Call) -> str:
    """Migrate the VM to ``target`` in a task (live with ``online``); returns the UPID."""
    p = call.params
    await _record(call)
    if p["migration_network"] is not None:
        raise RucherError(
            ErrorCode.UNSUPPORTED,
            "migration_network: migrations use each node's own migration address",
            details={"field": "migration_network"},
        )
    if p["with-conntrack-state"]:
        raise RucherError(
            ErrorCode.UNSUPPORTED,
            "with-conntrack-state: conntrack entries are not migrated",
            details={"field": "with-conntrack-state"},
        )
    command = call.command(
        compute.VmMigrate,
        vmid=p["vmid"],
        user=call.authid,
        target=p["target"],
        online=p["online"],
        with_local_disks=p["with-local-disks"],
        targetstorage=p["targetstorage"],
        bwlimit=p["bwlimit"],
        force=p["force"],
        tunnelled=p["migration_type"] == "secure",
    )
    reply = await call.ask(compute.GUEST_MIGRATE.to(node=p["node"]), command)
    return reply.upid
