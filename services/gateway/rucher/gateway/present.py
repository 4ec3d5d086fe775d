"""Cluster state in the shapes the Proxmox API returns it: resources, nodes, tasks.

Pure functions from the read model's records to Proxmox's JSON objects; booleans are written
``0``/``1`` as Proxmox writes them. Figures Rucher does not know (a guest's live CPU use, say)
are left out rather than invented.
"""

from __future__ import annotations

from typing import Any

from rucher.proto.cluster import NodeCapacity
from rucher.proto.common import PowerState
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.storage import StorageStatus
from rucher.proto.task import TaskState, TaskStatus

MIB = 1024 * 1024

_STATUS = {
    PowerState.RUNNING: "running",
    PowerState.PAUSED: "running",  # Proxmox reports a paused VM as running (qmpstatus: paused)
    PowerState.STOPPED: "stopped",
    PowerState.SUSPENDED: "stopped",  # suspended to disk: stopped, with the suspended lock
}


def _int(text: str | None, default: int) -> int:
    if text is None:
        return default
    head = text.split(",")[0].removeprefix("current=")
    return int(head) if head.isdigit() else default


def guest_resource(
    record: GuestRecord, state: PowerState | None, pool: str | None, node_cpus: int
) -> dict[str, Any]:
    """A ``/cluster/resources`` entry of type ``qemu`` or ``lxc``."""
    config = record.config
    qemu = record.type is GuestType.QEMU
    if qemu:
        name = config.get("name") or f"VM {record.vmid}"
        cpus = _int(config.get("vcpus"), 0) or _int(config.get("cores"), 1) * _int(
            config.get("sockets"), 1
        )
        memory = _int(config.get("memory"), 512)
    else:
        name = config.get("hostname") or f"CT{record.vmid}"
        cpus = _int(config.get("cores"), node_cpus or 1)
        memory = _int(config.get("memory"), 512)
    entry: dict[str, Any] = {
        "id": f"{record.type.value}/{record.vmid}",
        "type": record.type.value,
        "vmid": record.vmid,
        "node": record.node,
        "name": name,
        "status": _STATUS.get(state, "unknown") if state is not None else "unknown",
        "maxcpu": cpus,
        "maxmem": memory * MIB,
        "template": 1 if config.get("template") in {"1", "true"} else 0,
    }
    if config.get("tags"):
        entry["tags"] = config["tags"]
    if record.lock is not None:
        entry["lock"] = record.lock.value
    if pool is not None:
        entry["pool"] = pool
    return entry


def node_entry(
    node: str, online: bool, capacity: NodeCapacity | None, stats: bool
) -> dict[str, Any]:
    """A ``/nodes`` entry; figures only for callers allowed to audit the node."""
    entry: dict[str, Any] = {"node": node, "status": "online" if online else "offline"}
    if stats and capacity is not None:
        entry.update(
            cpu=capacity.cpu_usage,
            maxcpu=capacity.cpus,
            mem=capacity.memory_used,
            maxmem=capacity.memory_total,
            uptime=int(capacity.uptime),
            level="",
        )
    return entry


def node_resource(
    node: str, online: bool, capacity: NodeCapacity | None, stats: bool
) -> dict[str, Any]:
    """A ``/cluster/resources`` entry of type ``node``."""
    return {"id": f"node/{node}", "type": "node", **node_entry(node, online, capacity, stats)}


def storage_resource(node: str, status: StorageStatus) -> dict[str, Any]:
    """A ``/cluster/resources`` entry of type ``storage``."""
    return {
        "id": f"storage/{node}/{status.storage}",
        "type": "storage",
        "storage": status.storage,
        "node": node,
        "status": "available" if status.active and status.enabled else "unknown",
        "disk": status.used,
        "maxdisk": status.total,
        "content": ",".join(sorted(content.value for content in status.content)),
        "plugintype": status.storage_type.value,
        "shared": 1 if status.shared else 0,
    }


def node_status(capacity: NodeCapacity) -> dict[str, Any]:
    """``/nodes/{node}/status`` from the capacity the node's agent published."""
    cores = len({cpu for numa in capacity.numa for cpu in numa.cpus}) or capacity.cpus
    return {
        "cpu": capacity.cpu_usage,
        "cpuinfo": {
            "cpus": capacity.cpus,
            "sockets": capacity.sockets,
            "cores": max(1, cores // capacity.sockets),
            "model": capacity.cpu_model,
            "flags": " ".join(capacity.cpu_flags),
        },
        "memory": {
            "total": capacity.memory_total,
            "used": capacity.memory_used,
            "free": capacity.memory_total - capacity.memory_used,
        },
        "swap": {
            "total": capacity.swap_total,
            "used": capacity.swap_used,
            "free": capacity.swap_total - capacity.swap_used,
        },
        "loadavg": [f"{load:.2f}" for load in capacity.loadavg],
        "uptime": int(capacity.uptime),
        "pveversion": f"rucher/{capacity.version}" if capacity.version else "rucher",
        "kvm": 1 if capacity.kvm else 0,
        "arch": capacity.arch.value,
    }


def _task_fields(task: TaskState) -> dict[str, Any]:
    """What every task view shows; a token's tasks name the user and the token apart."""
    user, _, tokenid = task.user.partition("!")
    fields: dict[str, Any] = {
        "upid": task.upid,
        "node": task.node,
        "pid": task.pid,
        "pstart": task.pstart,
        "starttime": task.starttime,
        "type": task.type,
        "id": task.id,
        "user": user,
    }
    if tokenid:
        fields["tokenid"] = tokenid
    return fields


def task_entry(task: TaskState) -> dict[str, Any]:
    """A task as task lists show it: ``status`` and ``endtime`` once it has stopped."""
    entry = _task_fields(task)
    if task.status is TaskStatus.STOPPED:
        entry["status"] = task.exitstatus or "unknown"
        if task.endtime is not None:
            entry["endtime"] = int(task.endtime)
    return entry


def task_status(task: TaskState) -> dict[str, Any]:
    """``.../tasks/{upid}/status``: ``running`` or ``stopped`` with its exit status."""
    status = {**_task_fields(task), "status": task.status.value}
    if task.status is TaskStatus.STOPPED:
        status["exitstatus"] = task.exitstatus or "unknown"
    return status
