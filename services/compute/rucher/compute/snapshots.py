"""VM snapshots like ``qm snapshot``: sections in the guest document, disks through storage or QEMU.

A stopped guest's disks are snapshotted by the storage service. A running guest holds its qcow2
images open, so QEMU snapshots those itself (one QMP transaction, or ``savevm`` with the RAM when
``vmstate`` is asked); RBD images are snapshotted by the storage service either way. The config
at that moment becomes the snapshot's section, and the config's ``parent`` names the newest.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import structlog

from rucher.bus import RucherError
from rucher.compute import admission, disks
from rucher.compute.domain_xml import domain_name
from rucher.proto import compute
from rucher.proto.common import Done, PowerState
from rucher.proto.guest import GuestLock, GuestRecord
from rucher.proto.storage import DiskFormat, VolumeProtocol
from rucher.proto.task import TaskAccepted

if TYPE_CHECKING:
    from rucher.compute.ports import TaskLog
    from rucher.compute.service import ComputeService

log = structlog.get_logger("rucher.compute")

# Keys of a snapshot section that describe the snapshot, not the guest.
SNAPSHOT_KEYS = ("snaptime", "description", "vmstate", "parent", "snapstate")
RESERVED = "current"
Undo = list[Callable[[], Awaitable[object]]]


@dataclass(frozen=True)
class SnapshotDisk:
    """One disk of a snapshot: its key, volume, where QEMU has it, and who snapshots it live."""

    key: str
    volid: str
    path: str
    internal: bool


async def snapshot_disks(service: ComputeService, config: Mapping[str, str]) -> list[SnapshotDisk]:
    """The disks of ``config`` a snapshot covers, each checked to be able to have snapshots.

    ``internal`` marks qcow2 files, which QEMU snapshots while it runs; RBD images the storage
    service snapshots at any time. A raw file or a host device cannot be snapshotted at all.
    """
    found: list[SnapshotDisk] = []
    for key in disks.disk_keys(config):
        value = config[key]
        if "media=cdrom" in value.split(",")[1:]:
            continue
        volid = disks.disk_file(value)
        if volid.startswith("/") or key not in disks.volume_ids(config):
            raise admission.invalid(key, f"{key}: snapshot feature is not available ({volid})")
        mapping = await service.volumes.map(volid)
        internal = mapping.protocol is VolumeProtocol.FILE and mapping.format is DiskFormat.QCOW2
        if not internal and mapping.protocol is not VolumeProtocol.RBD:
            raise admission.invalid(
                key, f"{key}: snapshot feature is not available ({mapping.format} volume)"
            )
        found.append(SnapshotDisk(key=key, volid=volid, path=mapping.path, internal=internal))
    return found


def guest_config(section: Mapping[str, str]) -> dict[str, str]:
    """A snapshot section without the keys that describe the snapshot itself."""
    return {key: value for key, value in section.items() if key not in SNAPSHOT_KEYS}


def _check_name(record: GuestRecord, snapname: str, *, exists: bool) -> None:
    if snapname == RESERVED:
        raise admission.invalid("snapname", f"snapshot name '{RESERVED}' is reserved")
    if exists and snapname not in record.snapshots:
        raise admission.invalid("snapname", f"snapshot '{snapname}' does not exist")
    if not exists and snapname in record.snapshots:
        raise admission.invalid("snapname", f"snapshot name '{snapname}' already used")


async def _locked(
    service: ComputeService,
    command: compute.VmSnapshotCreate | compute.VmSnapshotRollback | compute.VmSnapshotDelete,
    lock: GuestLock,
    kind: str,
    body: Callable[[TaskLog], Awaitable[None]],
) -> TaskAccepted:
    """Take ``lock``, run ``body`` as a task and release the lock however it ends."""
    await service.guests.set_lock(command.vmid, lock)

    async def locked_body(task: TaskLog) -> None:
        try:
            await body(task)
        finally:
            await service.guests.clear_lock(command.vmid, lock)

    try:
        return await service.submit(kind, command, locked_body)
    except BaseException:
        await service.guests.clear_lock(command.vmid, lock)
        raise


async def create(service: ComputeService, command: compute.VmSnapshotCreate) -> TaskAccepted:
    """Snapshot a VM's disks (and RAM with ``vmstate`` while it runs); record the section."""
    record = await service.owned(command.vmid)
    _check_name(record, command.snapname, exists=False)
    if record.config.get("template") == "1":
        raise admission.invalid("vmid", "unable to snapshot a template")
    found = await snapshot_disks(service, record.config)
    running = await service.power_state(command.vmid) is not PowerState.STOPPED
    vmstate = command.vmstate and running
    if vmstate:
        for disk in found:
            if not disk.internal:
                raise admission.invalid(
                    "vmstate",
                    f"vmstate needs every disk in a qcow2 file; {disk.key} ('{disk.volid}') is not",
                )

    async def body(task: TaskLog) -> None:
        name = domain_name(command.vmid)
        undo: Undo = []
        done = False
        try:
            if vmstate:
                await task.log(f"saving VM state and disks to snapshot '{command.snapname}'")
                await service.hypervisor.save_vm(name, command.snapname)
                undo.append(
                    functools.partial(service.hypervisor.delete_vm_snapshot, name, command.snapname)
                )
            else:
                await _snapshot_disks(
                    service,
                    name,
                    snapname=command.snapname,
                    found=found,
                    running=running,
                    undo=undo,
                )
                for disk in found:
                    await task.log(f"snapshotting '{disk.key}' ({disk.volid})")
            await service.guests.rewrite(
                command.vmid,
                functools.partial(_with_section, command, vmstate, service.clock()),
                lock_held=GuestLock.SNAPSHOT,
            )
            done = True
        finally:
            if not done:
                await task.log("snapshot failed: removing the disk snapshots it made")
                await run_undo(undo)

    return await _locked(service, command, GuestLock.SNAPSHOT, "qmsnapshot", body)


async def _snapshot_disks(
    service: ComputeService,
    name: str,
    *,
    snapname: str,
    found: list[SnapshotDisk],
    running: bool,
    undo: Undo,
) -> None:
    live = [disk for disk in found if disk.internal and running]
    for disk in found:
        if disk in live:
            continue
        await service.volumes.snapshot(disk.volid, snapname)
        undo.append(functools.partial(service.volumes.delete_snapshot, disk.volid, snapname))
    if live:
        await service.hypervisor.snapshot_disks(name, snapname, [disk.path for disk in live])
        undo.append(functools.partial(service.hypervisor.delete_vm_snapshot, name, snapname))


def _with_section(
    command: compute.VmSnapshotCreate, vmstate: bool, now: float, record: GuestRecord
) -> GuestRecord:
    section = {**guest_config(record.config), "snaptime": str(int(now))}
    if command.description:
        section["description"] = command.description
    if vmstate:
        section["vmstate"] = "1"
    if "parent" in record.config:
        section["parent"] = record.config["parent"]
    return msgspec.structs.replace(
        record,
        config={**record.config, "parent": command.snapname},
        snapshots={**record.snapshots, command.snapname: section},
    )


async def rollback(service: ComputeService, command: compute.VmSnapshotRollback) -> TaskAccepted:
    """Stop the VM, put its disks and config back as they were, restore RAM or start it."""
    record = await service.owned(command.vmid)
    _check_name(record, command.snapname, exists=True)
    section = record.snapshots[command.snapname]
    found = await snapshot_disks(service, guest_config(section))

    async def body(task: TaskLog) -> None:
        name = domain_name(command.vmid)
        previous = await service.power_state(command.vmid)
        if previous is not PowerState.STOPPED:
            await task.log("stopping VM for the rollback")
            await service.hypervisor.stop(name)
            await service.state_changed(command.vmid, PowerState.STOPPED, previous, task.upid)
        for disk in found:
            await task.log(f"rolling back '{disk.key}' ({disk.volid})")
            await service.volumes.rollback(disk.volid, command.snapname)
        updated = await service.guests.rewrite(
            command.vmid,
            functools.partial(_rolled_back, command.snapname),
            lock_held=GuestLock.ROLLBACK,
        )
        await service.define(updated)
        if section.get("vmstate") == "1":
            await task.log("restoring the VM state saved with the snapshot")
            await service.hypervisor.start(name)
            await service.hypervisor.load_vm(name, command.snapname)
        elif command.start:
            await service.hypervisor.start(name)
        else:
            return
        await service.state_changed(command.vmid, PowerState.RUNNING, PowerState.STOPPED, task.upid)

    return await _locked(service, command, GuestLock.ROLLBACK, "qmrollback", body)


def _rolled_back(snapname: str, record: GuestRecord) -> GuestRecord:
    """The config of snapshot ``snapname``; disks made since it stay as ``unusedN``."""
    config = {**guest_config(record.snapshots[snapname]), "parent": snapname}
    kept = set(disks.owned_volumes(config, record.vmid))
    for volid in disks.owned_volumes(record.config, record.vmid):
        if volid not in kept:
            config[disks.next_unused(config)] = volid
    return msgspec.structs.replace(record, config=config, pending={}, pending_delete=())


async def delete(service: ComputeService, command: compute.VmSnapshotDelete) -> TaskAccepted:
    """Delete a snapshot's disk snapshots and its section; ``force`` drops the section anyway."""
    record = await service.owned(command.vmid)
    _check_name(record, command.snapname, exists=True)
    found = await snapshot_disks(service, guest_config(record.snapshots[command.snapname]))

    async def body(task: TaskLog) -> None:
        name = domain_name(command.vmid)
        running = await service.power_state(command.vmid) is not PowerState.STOPPED
        live = False
        for disk in found:
            if disk.internal and running:
                live = True
                continue
            try:
                await service.volumes.delete_snapshot(disk.volid, command.snapname)
            except RucherError as err:
                if not command.force:
                    raise
                await task.log(f"'{disk.key}': snapshot not deleted: {err.message}")
        if live:
            try:
                await service.hypervisor.delete_vm_snapshot(name, command.snapname)
            except RucherError as err:
                if not command.force:
                    raise
                await task.log(f"snapshot not deleted by QEMU: {err.message}")
        await service.guests.rewrite(
            command.vmid,
            functools.partial(_without_section, command.snapname),
            lock_held=GuestLock.SNAPSHOT_DELETE,
        )
        await task.log(f"snapshot '{command.snapname}' deleted")

    return await _locked(service, command, GuestLock.SNAPSHOT_DELETE, "qmdelsnapshot", body)


def _without_section(snapname: str, record: GuestRecord) -> GuestRecord:
    """Drop the section; its children and the config take its parent as theirs."""
    parent = record.snapshots[snapname].get("parent")
    snapshots: dict[str, dict[str, str]] = {}
    for other, section in record.snapshots.items():
        if other == snapname:
            continue
        snapshots[other] = _reparented(section, snapname, parent)
    return msgspec.structs.replace(
        record, config=_reparented(record.config, snapname, parent), snapshots=snapshots
    )


def _reparented(section: Mapping[str, str], snapname: str, parent: str | None) -> dict[str, str]:
    result = dict(section)
    if result.get("parent") == snapname:
        if parent is None:
            del result["parent"]
        else:
            result["parent"] = parent
    return result


async def run_undo(steps: Undo) -> None:
    """Run undo steps newest first; one failing is logged and does not stop the others."""
    for step in reversed(steps):
        try:
            await step()
        except RucherError as err:
            log.warning("undo_step_failed", error=err.message, code=err.code)


async def update(service: ComputeService, command: compute.VmSnapshotUpdate) -> Done:
    """Change a snapshot's description (an empty one removes it)."""
    record = await service.owned(command.vmid)
    _check_name(record, command.snapname, exists=True)
    await service.guests.rewrite(
        command.vmid, functools.partial(_described, command.snapname, command.description)
    )
    return Done()


def _described(snapname: str, description: str, record: GuestRecord) -> GuestRecord:
    section = record.snapshots.get(snapname)
    if section is None:
        raise admission.invalid("snapname", f"snapshot '{snapname}' does not exist")
    updated = {key: value for key, value in section.items() if key != "description"}
    if description:
        updated["description"] = description
    return msgspec.structs.replace(record, snapshots={**record.snapshots, snapname: updated})
