"""Hibernation, Proxmox's ``suspend --todisk``: the guest's state in a volume, restored by start.

The state goes to a raw volume the storage service allocates (``statestorage``, else
``vmstatestorage``, else the storage of the guest's first disk, else ``local``); libvirt writes
the running guest into it and stops the domain. The config records the volume as ``vmstate``
and the guest stays locked ``suspended``: the next start restores the guest from the volume (no
boot, no pending change applied), then frees the volume and clears the lock. A save that fails
leaves the guest running, unlocked, and frees the volume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from rucher.bus import RucherError
from rucher.compute import admission, disks, gpu
from rucher.compute.domain_xml import domain_name
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestRecord
from rucher.proto.storage import DiskFormat, VolumeMapping
from rucher.proto.task import TaskAccepted

if TYPE_CHECKING:
    from rucher.compute.ports import TaskLog
    from rucher.compute.service import ComputeService

STATE_KEY = "vmstate"
DEFAULT_STORAGE = "local"
# Proxmox sizes a state volume at twice the memory: QEMU's stream holds RAM and device state.
STATE_OVERHEAD = 32 << 20


def state_storage(config: Mapping[str, str], requested: str | None) -> str:
    """Where the state volume goes: as asked, ``vmstatestorage``, the first disk's storage."""
    if requested:
        return requested
    if config.get("vmstatestorage"):
        return config["vmstatestorage"]
    for key in disks.disk_keys(config):
        volid = disks.disk_file(config[key])
        if disks.VOLUME_ID.match(volid) and "media=cdrom" not in config[key]:
            return volid.split(":", 1)[0]
    return DEFAULT_STORAGE


def state_size(config: Mapping[str, str]) -> int:
    """The state volume's bytes: twice the memory, and room for device state."""
    memory = int((config.get("memory", "512") or "512").split(",")[0].removeprefix("current="))
    return 2 * (memory << 20) + STATE_OVERHEAD


async def suspend_to_disk(service: ComputeService, command: compute.VmSuspend) -> TaskAccepted:
    """Save a running guest's state to a new volume and stop it, locked ``suspended``."""
    vmid = command.vmid
    record = await service.owned(vmid, skiplock=command.skiplock)
    if gpu.has_devices(record.config):
        raise admission.invalid("todisk", "cannot hibernate a VM with PCI devices passed through")
    if await service.power_state(vmid) is PowerState.STOPPED:
        raise admission.invalid("vmid", f"VM {vmid} not running")
    storage = state_storage(record.config, command.statestorage)
    await service.guests.set_lock(vmid, GuestLock.SUSPENDED)

    async def body(task: TaskLog) -> None:
        volid: str | None = None
        try:
            volume = await service.volumes.allocate(
                storage, vmid, state_size(record.config), DiskFormat.RAW
            )
            volid = volume.volid
            path = _state_file(storage, await service.volumes.map(volid))
            await service.guests.update(
                vmid, changes={STATE_KEY: volid}, lock_held=GuestLock.SUSPENDED
            )
            await task.log(f"suspending VM {vmid} to '{volid}'")
            await service.hypervisor.save(domain_name(vmid), path)
        except BaseException:
            await _undo_suspend(service, vmid, volid, task)
            raise
        await task.log(f"VM {vmid} hibernated: its state is in '{volid}'")
        await service.state_changed(vmid, PowerState.STOPPED, PowerState.RUNNING, task.upid)

    try:
        return await service.submit("qmsuspend", command, body)
    except BaseException:
        await service.guests.clear_lock(vmid, GuestLock.SUSPENDED)
        raise


def _state_file(storage: str, mapping: VolumeMapping) -> str:
    """The host file of a state volume; a storage without files (rbd) cannot hold one."""
    if not mapping.path.startswith("/"):
        raise admission.invalid("statestorage", f"storage '{storage}' cannot hold a state file")
    return mapping.path


async def _undo_suspend(
    service: ComputeService, vmid: int, volid: str | None, task: TaskLog
) -> None:
    """The save failed: the guest runs on; forget and free the state volume, unlock."""
    try:
        if volid is not None:
            await service.guests.update(vmid, delete=[STATE_KEY], lock_held=GuestLock.SUSPENDED)
            await service.volumes.free(volid)
            await task.log(f"removed the state volume '{volid}'")
        await service.guests.clear_lock(vmid, GuestLock.SUSPENDED)
    except RucherError as err:
        await task.log(f"could not undo the suspend, check manually: {err.message}")


def hibernated(record: GuestRecord) -> bool:
    """Whether a guest waits in a state volume for its next start."""
    return record.lock is GuestLock.SUSPENDED and STATE_KEY in record.config


async def resume(service: ComputeService, record: GuestRecord, task: TaskLog) -> None:
    """Restore a hibernated guest from its state volume, then free it and clear the lock."""
    vmid, volid = record.vmid, record.config[STATE_KEY]
    mapping = await service.volumes.map(volid)
    await task.log(f"resuming VM {vmid} from '{volid}'")
    await service.hypervisor.restore(mapping.path)
    await service.guests.update(vmid, delete=[STATE_KEY], lock_held=GuestLock.SUSPENDED)
    await service.guests.clear_lock(vmid, GuestLock.SUSPENDED)
    try:
        await service.volumes.free(volid)
    except RucherError as err:
        await task.log(f"could not remove '{volid}', check manually: {err.message}")


def refuse_unless_resumable(record: GuestRecord, skiplock: bool) -> None:
    """A start is refused while the guest is locked, except to resume it from hibernation."""
    if record.lock is None or skiplock or hibernated(record):
        return
    raise RucherError(
        ErrorCode.LOCKED, f"VM is locked ({record.lock})", details={"lock": record.lock}
    )
