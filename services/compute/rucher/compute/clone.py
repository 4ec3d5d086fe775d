"""Templates and clones like ``qm template`` and ``qm clone``, disks through the storage service."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from rucher.bus import RucherError
from rucher.compute import admission, disks
from rucher.compute.disks import CloneOptions
from rucher.compute.domain_xml import NET_KEY, domain_name
from rucher.compute.snapshots import guest_config, run_undo
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestRecord, GuestType
from rucher.proto.storage import DiskFormat
from rucher.proto.task import TaskAccepted

if TYPE_CHECKING:
    from rucher.compute.ports import TaskLog
    from rucher.compute.service import ComputeService

Undo = list[Callable[[], Awaitable[object]]]
# Keys a clone does not inherit: it is no template, has no snapshots, and gets its own identity.
NOT_CLONED = ("template", "parent", "lock", "vmgenid", "meta")
MAC = re.compile(r"^(?P<model>[a-z0-9-]+)=[0-9A-Fa-f:]{17}(?P<rest>,.*)?$")


def is_template(config: Mapping[str, str]) -> bool:
    """Whether the config is a template's."""
    return config.get("template") == "1"


async def template(service: ComputeService, command: compute.VmTemplate) -> TaskAccepted:
    """Turn a stopped VM into a template: every disk becomes a base volume, ``template: 1``."""
    record = await service.owned(command.vmid)
    if is_template(record.config):
        raise admission.invalid("vmid", f"VM {command.vmid} is already a template")
    if await service.power_state(command.vmid) is not PowerState.STOPPED:
        raise admission.invalid("vmid", "you can't convert a VM to template if VM is running")
    if record.snapshots:
        raise admission.invalid("vmid", "you can't convert a VM to template if VM has snapshots")
    if command.disk is not None and command.disk not in record.config:
        raise admission.invalid("disk", f"no such disk '{command.disk}'")
    volumes = {
        key: volid
        for key, volid in disks.volume_ids(record.config).items()
        if "media=cdrom" not in record.config[key].split(",")[1:]
        and (command.disk is None or key == command.disk)
    }
    await service.guests.set_lock(command.vmid, GuestLock.DISK)

    async def body(task: TaskLog) -> None:
        try:
            for key, volid in volumes.items():
                if disks.owner(volid) != command.vmid or "/base-" in volid or ":base-" in volid:
                    continue
                new_volid = (await service.volumes.create_base(volid)).volid
                value = record.config[key].replace(volid, new_volid, 1)
                await service.guests.update(
                    command.vmid, changes={key: value}, lock_held=GuestLock.DISK
                )
                await task.log(f"{key}: '{volid}' is now the base volume '{new_volid}'")
            updated = await service.guests.update(
                command.vmid, changes={"template": "1"}, lock_held=GuestLock.DISK
            )
            await service.define(updated)
        finally:
            await service.guests.clear_lock(command.vmid, GuestLock.DISK)

    try:
        return await service.submit("qmtemplate", command, body)
    except BaseException:
        await service.guests.clear_lock(command.vmid, GuestLock.DISK)
        raise


def clone_config(source: Mapping[str, str], command: compute.VmClone) -> dict[str, str]:
    """The new guest's config: the source's, its own name, identity and MAC addresses."""
    config = {
        key: value
        for key, value in source.items()
        if key not in NOT_CLONED and not disks.UNUSED_KEY.match(key)
    }
    config["name"] = command.name or f"Copy-of-VM-{source.get('name', command.vmid)}"
    if command.description is not None:
        config["description"] = command.description
    if "smbios1" in config:
        options = [part for part in config["smbios1"].split(",") if not part.startswith("uuid=")]
        config["smbios1"] = ",".join([f"uuid={uuid.uuid4()}", *options])
    for key in [key for key in config if NET_KEY.match(key)]:
        found = MAC.match(config[key])
        if found is not None:
            config[key] = f"{found['model']}{found['rest'] or ''}"
    return admission.with_macs(config)


async def clone(service: ComputeService, command: compute.VmClone) -> TaskAccepted:
    """Copy a VM or template into ``newid``: every disk full, or linked to a template's bases."""
    record = await service.owned(command.vmid, skiplock=True)
    source, linked = await _checked(service, record, command)
    config = clone_config(source, command)
    cloned = {
        key: volid
        for key, volid in disks.volume_ids(config).items()
        if "media=cdrom" not in config[key].split(",")[1:]
    }
    initial = {key: value for key, value in config.items() if key not in cloned}
    # A template's bases never change, so templates are cloned concurrently; a VM is locked.
    release: Undo = []
    if not is_template(record.config):
        await service.guests.set_lock(command.vmid, GuestLock.CLONE)
        release.append(lambda: service.guests.clear_lock(command.vmid, GuestLock.CLONE))
    try:
        await service.guests.register(
            guest_type=GuestType.QEMU, node=service.node, config=initial, vmid=command.newid
        )
    except RucherError as taken:
        await run_undo(release)
        if taken.code is ErrorCode.EXISTS:
            raise admission.invalid("newid", taken.message) from taken
        raise
    options = CloneOptions(
        linked=linked,
        snapname=command.snapname,
        storage=None if linked else command.storage,
        format=None if linked or command.format is None else DiskFormat(command.format.value),
    )

    async def body(task: TaskLog) -> None:
        undo: Undo = [lambda: service.guests.remove(command.newid, lock_held=GuestLock.CREATE)]
        done = False
        try:
            for key, volid in cloned.items():
                kind = "linked" if linked else "full"
                await task.log(f"{key}: {kind} clone of '{volid}'")
                volume = await service.volumes.clone(volid, command.newid, options)
                undo.append(functools.partial(service.volumes.free, volume.volid))
                value = disks.recorded(config[key], volume.volid, volume.size)
                await service.guests.update(
                    command.newid, changes={key: value}, lock_held=GuestLock.CREATE
                )
            created = await service.guests.get(command.newid)
            await service.define(created)
            undo.append(lambda: service.hypervisor.undefine(domain_name(command.newid)))
            if command.pool is not None and service.pools is not None:
                await service.pools.join(command.pool, command.newid, command.user)
                undo.append(functools.partial(service.pools.leave, command.newid, command.user))
                await task.log(f"added VM {command.newid} to pool '{command.pool}'")
            await service.guests.clear_lock(command.newid, GuestLock.CREATE)
            await service.events.emit(
                compute.GUEST_CREATED,
                compute.VmCreated(
                    **service.event_fields(),
                    vmid=command.newid,
                    name=created.config.get("name", ""),
                    upid=task.upid,
                ),
            )
            done = True
        finally:
            if not done:
                await task.log("clone failed: removing what was made")
                await run_undo(undo)
            await run_undo(release)

    try:
        return await service.submit("qmclone", command, body)
    except BaseException:
        await run_undo(
            [*release, lambda: service.guests.remove(command.newid, lock_held=GuestLock.CREATE)]
        )
        raise


async def _checked(
    service: ComputeService, record: GuestRecord, command: compute.VmClone
) -> tuple[Mapping[str, str], bool]:
    """The config to clone (the snapshot's, if named) and whether the disks are linked."""
    source = record.config
    if command.snapname is not None:
        if command.snapname not in record.snapshots:
            raise admission.invalid("snapname", f"snapshot '{command.snapname}' does not exist")
        source = guest_config(record.snapshots[command.snapname])
    linked = _linked(record, command)
    if command.target not in (None, service.node):
        raise admission.invalid("target", "cloning to another node needs shared storage")
    running = await service.power_state(command.vmid) is not PowerState.STOPPED
    if not linked and running:
        # QEMU holds a running guest's images locked; a live copy would need drive-mirror.
        raise admission.invalid("vmid", f"VM {command.vmid} is running: stop it to clone it")
    if command.newid == command.vmid:
        raise admission.invalid("newid", "the new VMID must differ from the source's")
    if command.pool is not None and (
        service.pools is None or not await service.pools.exists(command.pool)
    ):
        raise admission.invalid("pool", f"pool '{command.pool}' does not exist")
    return source, linked


def _linked(record: GuestRecord, command: compute.VmClone) -> bool:
    """Linked by default from a template; a normal VM is always copied in full."""
    if command.full is None:
        return is_template(record.config)
    if not command.full and not is_template(record.config):
        raise admission.invalid("full", "linked clones need a template: set full=1")
    if not command.full and command.storage is not None:
        raise admission.invalid("storage", "a linked clone stays on the storage of its base")
    if not command.full and command.format is not None:
        raise admission.invalid("format", "a linked clone keeps the format of its base")
    return not command.full
