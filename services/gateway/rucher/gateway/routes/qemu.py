"""``/nodes/{node}/qemu``: virtual machines, each call one typed request to the node's agent.

The schema has checked the parameters and the permission clause by the time a handler runs;
the handler builds the agent's command (config keys as Proxmox strings) and returns the UPID the
agent answers with, or its status report.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rucher.bus import RucherError
from rucher.gateway import present
from rucher.gateway.permissions import forbidden
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import compute
from rucher.proto.base import RpcSubject
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.task import TaskAccepted, TaskStatus
from rucher.pve.params import ParamError

ROUTES = RouteTable()

# Parameters of create and config updates that are not guest config keys.
CREATE_CONTROLS = frozenset(
    {"node", "vmid", "start", "pool", "archive", "storage", "force", "unique", "live-restore",
     "bwlimit"}
)  # fmt: skip
UPDATE_CONTROLS = frozenset(
    {"node", "vmid", "delete", "revert", "digest", "force", "skiplock", "background_delay"}
)
TASK_POLL = 0.02


def _config_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _config(call: Call, controls: frozenset[str]) -> dict[str, str]:
    return {
        name: _config_value(value)
        for name, value in call.params.values.items()
        if name not in controls and value is not None
    }


async def _record(call: Call) -> GuestRecord:
    """The guest's document, which must be a VM on the node named in the path."""
    vmid, node = call.params["vmid"], call.params["node"]
    record = await call.gateway.guests.get(vmid)
    if record.node != node or record.type is not GuestType.QEMU:
        raise RucherError(
            ErrorCode.NOT_FOUND,
            f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist",
        )
    return record


async def _task(call: Call, subject: RpcSubject[Any, TaskAccepted], message: Any) -> str:
    reply = await call.ask(subject.to(node=call.params["node"]), message)
    return reply.upid


@ROUTES("GET", "/nodes/{node}/qemu")
async def list_vms(call: Call) -> list[dict[str, Any]]:
    """The node's VMs the caller may audit, with their last known state."""
    node = call.params["node"]
    model = call.gateway.model
    entries = []
    for vmid, record in sorted(model.guests.items()):
        if record.node != node or record.type is not GuestType.QEMU:
            continue
        if not call.allowed(f"/vms/{vmid}", ["VM.Audit"]):
            continue
        entry = present.guest_resource(record, model.guest_state.get(vmid), None, 0)
        entries.append(
            {
                "vmid": vmid,
                "name": entry["name"],
                "status": entry["status"],
                "cpus": entry["maxcpu"],
                "maxmem": entry["maxmem"],
                **({"tags": entry["tags"]} if "tags" in entry else {}),
                **({"lock": entry["lock"]} if "lock" in entry else {}),
            }
        )
    return entries


@ROUTES("POST", "/nodes/{node}/qemu")
async def create_vm(call: Call) -> str:
    """Create a VM: VM.Allocate on /vms/{vmid} or on the pool it joins."""
    p = call.params
    vmid, pool = p["vmid"], p["pool"]
    allowed = call.allowed(f"/vms/{vmid}", ["VM.Allocate"]) or (
        pool is not None and call.allowed(f"/pool/{pool}", ["VM.Allocate"])
    )
    if not allowed:
        raise forbidden(f"Permission check failed (/vms/{vmid}, VM.Allocate)")
    if p["archive"] is not None:
        raise RucherError(ErrorCode.UNSUPPORTED, "restoring from a backup is not supported yet")
    command = call.command(
        compute.VmCreate,
        vmid=vmid,
        user=call.authid,
        config=_config(call, CREATE_CONTROLS),
        start=p["start"],
        pool=pool,
    )
    return await _task(call, compute.GUEST_CREATE, command)


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/config")
async def vm_config(call: Call) -> dict[str, Any]:
    """The guest's config with pending changes applied (unless ``current``), or a snapshot's."""
    record = await _record(call)
    snapname = call.params["snapshot"]
    if snapname is not None:
        section = record.snapshots.get(snapname)
        if section is None:
            raise ParamError({"snapshot": f"snapshot '{snapname}' does not exist"})
        snapshot: dict[str, Any] = {**section, "digest": record.digest}
        if "snaptime" in snapshot:
            snapshot["snaptime"] = int(snapshot["snaptime"])
        return snapshot
    config: dict[str, Any] = dict(record.config)
    if not call.params["current"]:
        config.update(record.pending)
        for key in record.pending_delete:
            config.pop(key, None)
    if record.lock is not None:
        config["lock"] = record.lock.value
    if "cipassword" in config:
        config["cipassword"] = "**********"  # as Proxmox: the password never leaves the config
    config["digest"] = record.digest
    return config


async def _update(call: Call) -> str:
    p = call.params
    await _record(call)
    delete = tuple(name for name in (p["delete"] or "").replace(";", ",").split(",") if name)
    revert = tuple(name for name in (p["revert"] or "").replace(";", ",").split(",") if name)
    command = call.command(
        compute.VmConfigUpdate,
        vmid=p["vmid"],
        user=call.authid,
        config=_config(call, UPDATE_CONTROLS),
        delete=delete,
        revert=revert,
        digest=p["digest"],
        force=p["force"],
        skiplock=p["skiplock"],
    )
    return await _task(call, compute.GUEST_CONFIG_UPDATE, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/config")
async def update_config_async(call: Call) -> str:
    """Change the config in a task; returns its UPID."""
    return await _update(call)


@ROUTES("PUT", "/nodes/{node}/qemu/{vmid}/config")
async def update_config(call: Call) -> None:
    """Change the config and return once the change is written (or fail with its reason)."""
    upid = await _update(call)
    deadline = time.monotonic() + call.gateway.settings.request_timeout
    state = await call.gateway.tasks.get(upid)
    while state.status is TaskStatus.RUNNING:
        if time.monotonic() > deadline:
            raise RucherError(ErrorCode.TIMEOUT, f"config update {upid} did not finish in time")
        await asyncio.sleep(TASK_POLL)
        state = await call.gateway.tasks.get(upid)
    if state.exitstatus != "OK":
        if state.error is not None:
            raise RucherError.from_reply(state.error)
        raise RucherError(ErrorCode.INTERNAL, state.exitstatus or "unknown")


@ROUTES("DELETE", "/nodes/{node}/qemu/{vmid}")
async def destroy_vm(call: Call) -> str:
    """Destroy a stopped VM and free its VMID."""
    p = call.params
    await _record(call)
    command = call.command(
        compute.VmDestroy,
        vmid=p["vmid"],
        user=call.authid,
        purge=p["purge"],
        destroy_unreferenced_disks=p["destroy-unreferenced-disks"],
        skiplock=p["skiplock"],
    )
    return await _task(call, compute.GUEST_DESTROY, command)


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/status/current")
async def vm_status(call: Call) -> dict[str, Any]:
    """State and counters, from the agent that runs the VM."""
    await _record(call)
    report = await call.ask(
        compute.GUEST_STATUS.to(node=call.params["node"]),
        compute.VmStatusQuery(vmid=call.params["vmid"]),
    )
    running = report.status.value != "stopped"
    status: dict[str, Any] = {
        "vmid": report.vmid,
        "name": report.name,
        "status": "running" if running else "stopped",
        "qmpstatus": report.status.value if running else "stopped",
        "uptime": int(report.uptime),
        "cpu": report.cpu,
        "cpus": report.cpus,
        "mem": report.mem,
        "maxmem": report.maxmem,
        "disk": report.disk,
        "maxdisk": report.maxdisk,
        "diskread": report.diskread,
        "diskwrite": report.diskwrite,
        "netin": report.netin,
        "netout": report.netout,
        "ha": {"managed": 0},
    }
    if report.pid is not None:
        status["pid"] = report.pid
    if report.lock is not None:
        status["lock"] = report.lock.value
    if report.tags:
        status["tags"] = ";".join(report.tags)
    if report.template:
        status["template"] = 1
    return status


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/status/start")
async def start_vm(call: Call) -> str:
    """Start the VM."""
    p = call.params
    command = call.command(
        compute.VmStart,
        vmid=p["vmid"],
        user=call.authid,
        timeout=p["timeout"],
        skiplock=p["skiplock"],
        machine=p["machine"],
        force_cpu=p["force-cpu"],
    )
    return await _task(call, compute.GUEST_START, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/status/stop")
async def stop_vm(call: Call) -> str:
    """Stop the VM at once."""
    p = call.params
    command = call.command(
        compute.VmStop,
        vmid=p["vmid"],
        user=call.authid,
        timeout=p["timeout"],
        skiplock=p["skiplock"],
        keep_active=p["keepActive"],
        overrule_shutdown=p["overrule-shutdown"],
    )
    return await _task(call, compute.GUEST_STOP, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown")
async def shutdown_vm(call: Call) -> str:
    """ACPI shutdown, optionally forced after ``timeout``."""
    p = call.params
    command = call.command(
        compute.VmShutdown,
        vmid=p["vmid"],
        user=call.authid,
        timeout=p["timeout"],
        force_stop=p["forceStop"],
        keep_active=p["keepActive"],
        skiplock=p["skiplock"],
    )
    return await _task(call, compute.GUEST_SHUTDOWN, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/status/reboot")
async def reboot_vm(call: Call) -> str:
    """Shut down and start again."""
    p = call.params
    command = call.command(compute.VmReboot, vmid=p["vmid"], user=call.authid, timeout=p["timeout"])
    return await _task(call, compute.GUEST_REBOOT, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/status/reset")
async def reset_vm(call: Call) -> str:
    """Press the reset button."""
    p = call.params
    command = call.command(
        compute.VmReset, vmid=p["vmid"], user=call.authid, skiplock=p["skiplock"]
    )
    return await _task(call, compute.GUEST_RESET, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/status/suspend")
async def suspend_vm(call: Call) -> str:
    """Pause the VM (``todisk`` also needs VM.Config.Disk)."""
    p = call.params
    if p["todisk"] and not call.allowed(f"/vms/{p['vmid']}", ["VM.Config.Disk"]):
        raise forbidden(f"Permission check failed (/vms/{p['vmid']}, VM.Config.Disk)")
    command = call.command(
        compute.VmSuspend,
        vmid=p["vmid"],
        user=call.authid,
        todisk=p["todisk"],
        statestorage=p["statestorage"],
        skiplock=p["skiplock"],
    )
    return await _task(call, compute.GUEST_SUSPEND, command)


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/status/resume")
async def resume_vm(call: Call) -> str:
    """Resume a paused VM."""
    p = call.params
    command = call.command(
        compute.VmResume,
        vmid=p["vmid"],
        user=call.authid,
        skiplock=p["skiplock"],
        nocheck=p["nocheck"],
    )
    return await _task(call, compute.GUEST_RESUME, command)
