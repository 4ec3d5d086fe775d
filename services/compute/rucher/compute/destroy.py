"""What a destroyed VM leaves behind, removed: every volume it owns, its pool memberships.

Like ``qm destroy``: the volumes of the config, of pending changes and of snapshot sections go;
with ``destroy-unreferenced-disks`` also any volume named for the VMID that no config mentions
(left over by a crash, say). A volume that cannot go is reported in the task and left, as
Proxmox does. The VM leaves every resource pool whether or not ``purge`` is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from rucher.bus import RucherError
from rucher.compute import disks
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord

if TYPE_CHECKING:
    from rucher.compute.ports import TaskLog
    from rucher.compute.service import ComputeService

log = structlog.get_logger("rucher.compute")


async def free_everything(
    service: ComputeService, record: GuestRecord, unreferenced: bool, task: TaskLog
) -> None:
    """Free the guest's volumes (and, when asked, the unreferenced ones named for it)."""
    volids = disks.every_owned_volume(record.config, record.pending, record.snapshots, record.vmid)
    state = record.config.get("vmstate", "")  # a hibernated guest's saved state
    if state and disks.owner(state) == record.vmid and state not in volids:
        volids.append(state)
    if unreferenced:
        try:
            extra = await service.volumes.owned_by(record.vmid)
        except RucherError as err:
            await task.log(f"could not list unreferenced disks: {err.message}")
            extra = []
        for volid in extra:
            if volid not in volids and disks.owner(volid) == record.vmid:
                await task.log(f"'{volid}' is not referenced in the config: removing it too")
                volids.append(volid)
    for volid in volids:
        try:
            await service.volumes.free(volid)
        except RucherError as err:
            log.warning("volume_not_freed", vmid=record.vmid, volid=volid, error=err.message)
            await task.log(f"Could not remove disk '{volid}', check manually: {err.message}")
            continue
        await task.log(f"removed volume '{volid}'")


async def leave_pools(service: ComputeService, vmid: int, actor: str, task: TaskLog) -> None:
    """Take the destroyed VM out of every pool; a failure is logged, never raised."""
    if service.pools is None:
        return
    try:
        left = await service.pools.leave(vmid, actor)
    except RucherError as err:
        log.warning("pool_not_left", vmid=vmid, error=err.message)
        await task.log(f"could not remove VM {vmid} from its pool: {err.message}")
        return
    for poolid in left:
        await task.log(f"removed VM {vmid} from pool '{poolid}'")


async def refuse_if_linked(service: ComputeService, record: GuestRecord) -> None:
    """A template whose base volumes back other guests' linked clones cannot be destroyed."""
    bases = [
        volid
        for volid in disks.owned_volumes(record.config, record.vmid)
        if f"base-{record.vmid}-" in volid
    ]
    if not bases:
        return
    for other in await service.guests.list():
        if other.vmid == record.vmid:
            continue
        for value in [*other.config.values(), *other.pending.values()]:
            used = next((base for base in bases if disks.disk_file(value).startswith(base)), None)
            if used is not None:
                raise RucherError(
                    ErrorCode.INVALID,
                    f"base volume '{used}' is still in use by linked clone VM {other.vmid}",
                    details={"field": "vmid"},
                )
