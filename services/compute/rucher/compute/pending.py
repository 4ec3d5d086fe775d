"""Config changes like ``qm set``: new and removed disks, pending changes, disk resize.

A stopped guest takes every change at once. A running guest takes at once only what needs no
hardware change (name, description, tags...); the rest waits in the document's pending section
and applies at its next start, as Proxmox does without hot-plug. New disks are allocated when
asked, either way, so the pending value already names the volume.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from rucher.bus import RucherError
from rucher.compute import admission, disks, hotplug
from rucher.compute.domain_xml import DISK_KEY, domain_name
from rucher.compute.snapshots import Undo, run_undo
from rucher.guests import MODIFIED
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord
from rucher.proto.task import TaskAccepted

if TYPE_CHECKING:
    from rucher.compute.ports import TaskLog
    from rucher.compute.service import ComputeService

# What a running guest takes at once (Proxmox's "fast plug" options).
FAST_PLUG = frozenset(
    {"name", "description", "onboot", "protection", "tags", "startup", "hookscript", "shares",
     "vmstatestorage", "lock"}
)  # fmt: skip


def effective(record: GuestRecord) -> dict[str, str]:
    """The config as it will be once the pending changes apply."""
    config = {**record.config, **record.pending}
    for key in record.pending_delete:
        config.pop(key, None)
    return config


def _referenced(record: GuestRecord) -> set[str]:
    """Volumes still named by a disk, a pending value or a snapshot section."""
    found: set[str] = set()
    for section in [record.config, record.pending, *record.snapshots.values()]:
        for key, value in section.items():
            if DISK_KEY.match(key) or disks.UNUSED_KEY.match(key):
                found.add(disks.disk_file(value))
    return found


def _detach(config: dict[str, str], key: str, vmid: int) -> None:
    """Remove disk ``key``; a volume the guest owns stays as ``unusedN`` (Proxmox)."""
    value = config.pop(key, None)
    if value is None or not DISK_KEY.match(key):
        return
    volid = disks.disk_file(value)
    if disks.owned_volumes({key: value}, vmid) and volid not in _volumes(config):
        config[disks.next_unused(config)] = volid


def _volumes(config: Mapping[str, str]) -> set[str]:
    return {
        disks.disk_file(value)
        for key, value in config.items()
        if DISK_KEY.match(key) or disks.UNUSED_KEY.match(key)
    }


def _apply(
    record: GuestRecord, changes: Mapping[str, str], delete: tuple[str, ...], force: bool = False
) -> GuestRecord:
    config = {**record.config, **changes}
    for key in delete:
        if force or disks.UNUSED_KEY.match(key):
            config.pop(key, None)
        else:
            _detach(config, key, record.vmid)
    return msgspec.structs.replace(record, config=config)


def _applied_pending(record: GuestRecord) -> GuestRecord:
    applied = _apply(record, record.pending, record.pending_delete)
    return msgspec.structs.replace(applied, pending={}, pending_delete=())


async def apply_pending(service: ComputeService, vmid: int) -> GuestRecord:
    """Fold the pending section into the config (at start), returning the new document."""
    record = await service.guests.get(vmid)
    if not record.pending and not record.pending_delete:
        return record
    return await service.guests.rewrite(vmid, _applied_pending, lock_held=record.lock)


async def update_config(service: ComputeService, command: compute.VmConfigUpdate) -> TaskAccepted:
    """Check and write config changes: at once when stopped, pending what a running guest needs."""
    record = await service.owned(command.vmid, skiplock=command.skiplock)
    _check_digest(record, command.digest)
    _check_keys(record, command)
    config = {**effective(record), **command.config}
    for key in command.delete:
        config.pop(key, None)
    admission.render(command.vmid, config, service.facts)
    admission.check_node(
        config, await service.hypervisor.node(), await service.hypervisor.bridges()
    )
    requested = {request.key for request in disks.requested(command.config)}
    await service.map_volumes({k: v for k, v in command.config.items() if k not in requested})
    changes = admission.with_macs(dict(command.config))
    lock_held = record.lock if command.skiplock else None

    async def body(task: TaskLog) -> None:
        undo: Undo = []
        done = False
        try:
            allocated = await _allocate(service, command.vmid, changes, task, undo)
            running = await service.power_state(command.vmid) is not PowerState.STOPPED
            freed = unlinked(await service.guests.get(command.vmid), command)
            updated = await service.guests.rewrite(
                command.vmid,
                functools.partial(_changed, command, {**changes, **allocated}, running),
                digest=command.digest,
                lock_held=lock_held,
            )
            done = True
        finally:
            if not done:
                await task.log("config update failed: freeing the disks it allocated")
                await run_undo(undo)
        if not running:
            await service.define(updated)
        else:
            updated = await hotplug.plug_pending(service, updated, task)
        await _free_unlinked(service, freed, updated, task)
        if running and (updated.pending or updated.pending_delete):
            pending = sorted({*updated.pending, *updated.pending_delete})
            await task.log(f"the guest runs: {', '.join(pending)} apply at its next start")

    return await service.submit("qmconfig", command, body)


def _check_digest(record: GuestRecord, digest: str | None) -> None:
    if digest is not None and digest != record.digest:
        raise RucherError(ErrorCode.CONFLICT, MODIFIED, details={"field": "digest"})


def _check_keys(record: GuestRecord, command: compute.VmConfigUpdate) -> None:
    overlap = set(command.delete) & set(command.config)
    if overlap:
        name = sorted(overlap)[0]
        raise admission.invalid("delete", f"{name}: cannot set and delete at once")
    for key in command.revert:
        if key in command.config or key in command.delete:
            raise admission.invalid("revert", f"{key}: cannot revert and change at once")
    known = {*record.config, *record.pending}
    for key in command.delete:
        if key not in known:
            raise admission.invalid("delete", f"{key}: no such option")
    if "template" in command.config or "parent" in command.config:
        name = "template" if "template" in command.config else "parent"
        raise admission.invalid(name, f"{name}: cannot be set directly")


async def _allocate(
    service: ComputeService, vmid: int, changes: dict[str, str], task: TaskLog, undo: Undo
) -> dict[str, str]:
    allocated: dict[str, str] = {}
    for request in disks.requested(changes):
        volume = await service.volumes.allocate(request.storage, vmid, request.size, request.format)
        undo.append(functools.partial(service.volumes.free, volume.volid))
        allocated[request.key] = disks.recorded(changes[request.key], volume.volid, volume.size)
        await task.log(f"{request.key}: allocated volume '{volume.volid}'")
    return allocated


def _changed(
    command: compute.VmConfigUpdate,
    changes: dict[str, str],
    running: bool,
    record: GuestRecord,
) -> GuestRecord:
    pending = {k: v for k, v in record.pending.items() if k not in command.revert}
    pending_delete = tuple(k for k in record.pending_delete if k not in command.revert)
    config = dict(record.config)
    for key in command.revert:
        value = record.pending.get(key)
        if value is not None and DISK_KEY.match(key):
            _park(config, value, record.vmid)
    reverted = msgspec.structs.replace(
        record, config=config, pending=pending, pending_delete=pending_delete
    )
    if not running:
        # A stopped guest takes what was still pending too, as Proxmox applies it on any update.
        left = tuple(k for k in pending_delete if k not in changes)
        folded = _apply(reverted, {**pending, **changes}, left)
        applied = _apply(folded, {}, command.delete, command.force)
        return msgspec.structs.replace(applied, pending={}, pending_delete=())
    now = {k: v for k, v in changes.items() if k in FAST_PLUG}
    later = {k: v for k, v in changes.items() if k not in FAST_PLUG}
    deleted_now = tuple(k for k in command.delete if _now(k))
    config = {**config, **now}
    for key in deleted_now:
        config.pop(key, None)
    for key, value in later.items():
        if key in pending and DISK_KEY.match(key) and pending[key] != value:
            _park(config, pending[key], record.vmid)
    return msgspec.structs.replace(
        reverted,
        config=config,
        pending={**pending, **later},
        pending_delete=tuple(
            dict.fromkeys(
                [k for k in pending_delete if k not in later]
                + [k for k in command.delete if not _now(k)]
            )
        ),
    )


def _now(key: str) -> bool:
    """Whether deleting ``key`` from a running guest takes effect at once."""
    return key in FAST_PLUG or bool(disks.UNUSED_KEY.match(key))


def _park(config: dict[str, str], value: str, vmid: int) -> None:
    """Keep a volume the guest owns but no longer uses as ``unusedN``."""
    volid = disks.disk_file(value)
    if disks.owned_volumes({"scsi0": value}, vmid) and volid not in _volumes(config):
        config[disks.next_unused(config)] = volid


def unlinked(record: GuestRecord, command: compute.VmConfigUpdate) -> list[str]:
    """Volumes this update removes for good: deleted ``unusedN``, and disks with ``force``."""
    found: list[str] = []
    for key in command.delete:
        value = record.config.get(key)
        if value is None or not (
            disks.UNUSED_KEY.match(key) or (command.force and DISK_KEY.match(key))
        ):
            continue
        found.extend(disks.owned_volumes({"unused0": disks.disk_file(value)}, record.vmid))
    return found


async def _free_unlinked(
    service: ComputeService, volids: list[str], record: GuestRecord, task: TaskLog
) -> None:
    """Free volumes that left the config, unless a snapshot or pending value still names one."""
    still = _referenced(record)
    for volid in volids:
        if volid in still:
            await task.log(f"'{volid}' is still used by a snapshot: kept")
            continue
        await service.free_volumes(record.vmid, {"unused0": volid}, task)


async def resize(service: ComputeService, command: compute.VmDiskResize) -> TaskAccepted:
    """Grow a disk: by the storage service when stopped, by QEMU (``block_resize``) when running."""
    record = await service.owned(command.vmid, skiplock=command.skiplock)
    _check_digest(record, command.digest)
    value = record.config.get(command.disk)
    if value is None:
        raise admission.invalid("disk", f"{command.disk}: no such disk")
    volid = disks.volume_ids(record.config).get(command.disk)
    if volid is None or "media=cdrom" in value.split(",")[1:]:
        raise admission.invalid("disk", f"{command.disk}: only storage disks can be resized")
    current = (await service.volumes.info(volid)).size
    size = current + command.size if command.relative else command.size
    if size < current:
        raise admission.invalid(
            "size", f"shrinking disks is not supported ({current} to {size} bytes)"
        )
    lock_held = record.lock if command.skiplock else None

    async def body(task: TaskLog) -> None:
        name = domain_name(command.vmid)
        if size == current:
            await task.log(f"{command.disk}: already {disks.format_size(size)}")
            return
        if await service.power_state(command.vmid) is PowerState.STOPPED:
            size_now = (await service.volumes.resize(volid, size)).size
        else:
            mapping = await service.volumes.map(volid)
            await service.hypervisor.block_resize(name, mapping.path, size)
            size_now = (await service.volumes.info(volid)).size
        await task.log(f"{command.disk}: resized to {disks.format_size(size_now)}")
        await service.guests.rewrite(
            command.vmid,
            functools.partial(_sized, command.disk, size_now),
            lock_held=lock_held,
        )

    return await service.submit("qmresize", command, body)


def _sized(key: str, size: int, record: GuestRecord) -> GuestRecord:
    value = record.config.get(key)
    if value is None:
        return record
    volid = disks.disk_file(value)
    resized = disks.recorded(value, volid, size)
    return msgspec.structs.replace(record, config={**record.config, key: resized})
