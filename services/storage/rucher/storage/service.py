"""The storage service's domain logic: status, content, and every volume operation of a node.

It checks what the caller asked (storage, content type, format, name, size, free space) before
any change, leaves the change itself to the storage's driver, and reports what happened as
events. It depends only on the interfaces in :mod:`rucher.storage.ports` and the driver pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.proto.common import Done
from rucher.proto.guest import GuestType
from rucher.proto.storage import (
    STATUS_PUBLISHED,
    VOLUME_ALLOCATED,
    VOLUME_FREED,
    VOLUME_ORPHAN_FOUND,
    VOLUME_RENAMED,
    VOLUME_RESIZED,
    ContentListing,
    ContentListQuery,
    ContentType,
    DiskFormat,
    OrphanQuery,
    OrphanReport,
    StorageDefinition,
    StorageStatus,
    StorageStatusPublished,
    StorageStatusQuery,
    StorageStatusReport,
    StorageType,
    VolumeAllocate,
    VolumeAllocated,
    VolumeClone,
    VolumeCreateBase,
    VolumeDetails,
    VolumeFree,
    VolumeFreed,
    VolumeInfo,
    VolumeInfoQuery,
    VolumeMap,
    VolumeMapping,
    VolumeOrphanFound,
    VolumeRename,
    VolumeRenamed,
    VolumeResize,
    VolumeResized,
    VolumeSnapshotCreate,
    VolumeSnapshotDelete,
    VolumeSnapshotRollback,
    VolumeUnmap,
    VolumeUpdate,
)
from rucher.storage import volnames
from rucher.storage.checks import check_content, check_space, gib, kib_rounded, new_disk
from rucher.storage.copies import Copier
from rucher.storage.drivers.interface import Capacity, Volume
from rucher.storage.inuse import in_use
from rucher.storage.pool import DriverPool, applies_to
from rucher.storage.ports import EventSink, GuestDirectory
from rucher.storage.volnames import invalid

log = structlog.get_logger("rucher.storage")

DISK_CONTENT = (ContentType.IMAGES, ContentType.ROOTDIR)


def storage_status(definition: StorageDefinition, capacity: Capacity | None) -> StorageStatus:
    """A storage as this node sees it; without a capacity it is inactive."""
    return StorageStatus(
        storage=definition.storage,
        storage_type=definition.storage_type,
        content=definition.content,
        shared=definition.shared,
        enabled=not definition.disable,
        active=capacity is not None and capacity.active,
        total=capacity.total if capacity else 0,
        used=capacity.used if capacity else 0,
        avail=capacity.avail if capacity else 0,
    )


class StorageService:
    """Every node-scoped ``rpc.storage.*`` operation except uploads and downloads."""

    def __init__(
        self,
        *,
        node: str,
        pool: DriverPool,
        guests: GuestDirectory,
        events: EventSink,
        copier: Copier,
    ) -> None:
        self.node = node
        self.pool = pool
        self.guests = guests
        self.events = events
        self.copier = copier

    # Helpers -----------------------------------------------------------------------------

    def _event(self) -> dict[str, Any]:
        return {"event_id": new_id(), "node": self.node, "time": time.time()}

    def _info(self, storage: str, volume: Volume, guests: dict[int, GuestType]) -> VolumeInfo:
        content = volume.content
        if content is ContentType.IMAGES and guests.get(volume.vmid or 0) is GuestType.LXC:
            content = ContentType.ROOTDIR
        return VolumeInfo(
            volid=f"{storage}:{volume.name}",
            content=content,
            format=volume.format,
            size=volume.size,
            used=volume.used,
            vmid=volume.vmid,
            parent=f"{storage}:{volume.parent}" if volume.parent else None,
            protected=volume.protected,
            notes=volume.notes,
            ctime=volume.ctime,
            path=volume.path,
        )

    async def _refuse_running(
        self, volid: str, definition: StorageDefinition | None = None
    ) -> None:
        """Refuse to change a volume that a running guest has attached.

        On a storage that is not shared, only this node's guests can attach its volumes: a
        guest elsewhere naming the same volume id uses its own node's copy (after a migration).
        """
        local = definition is not None and not definition.shared
        running = await self.guests.running_users(volid, self.node if local else None)
        if running:
            raise in_use(volid, running)

    def _details(self, storage: str, volume: Volume) -> VolumeDetails:
        return VolumeDetails(volume=self._info(storage, volume, {}))

    def _allocated(self, volid: str, volume: Volume, source: str | None = None) -> None:
        event = VolumeAllocated(
            **self._event(), volid=volid, size=volume.size, vmid=volume.vmid, source=source
        )
        self.events.emit(VOLUME_ALLOCATED.to(node=self.node), event)

    # Status and content ------------------------------------------------------------------

    async def status(self, query: StorageStatusQuery) -> StorageStatusReport:
        """Each storage this node may use, with its space (``GET /nodes/{node}/storage``)."""
        records = [
            record
            for record in await self.pool.book.all()
            if applies_to(record.definition, self.node)
            and (query.storage is None or record.definition.storage == query.storage)
            and (query.content is None or query.content in record.definition.content)
            and not (query.enabled_only and record.definition.disable)
        ]
        if query.storage is not None and not records:
            await self.pool.record(query.storage)  # not_found when it does not exist at all

        async def one(definition: StorageDefinition) -> StorageStatus:
            capacity = None
            if not definition.disable:
                try:
                    driver, _ = await self.pool.driver(definition.storage)
                    capacity = await driver.status()
                except RucherError as err:
                    log.warning(
                        "storage_status_failed", storage=definition.storage, error=err.message
                    )
            return storage_status(definition, capacity)

        statuses = await asyncio.gather(*(one(record.definition) for record in records))
        return StorageStatusReport(storages=tuple(statuses))

    async def content_list(self, query: ContentListQuery) -> ContentListing:
        """A storage's volumes, by content type and owner (``GET .../content``)."""
        driver, definition = await self.pool.driver(query.storage)
        if query.content is not None:
            check_content(definition, query.content)
        volumes = await driver.list_volumes(query.content, query.vmid)
        guests = await self.guests.guests() if any(v.vmid for v in volumes) else {}
        infos = [self._info(definition.storage, volume, guests) for volume in volumes]
        wanted = {query.content} if query.content else set(definition.content)
        return ContentListing(volumes=tuple(info for info in infos if info.content in wanted))

    async def volume_info(self, query: VolumeInfoQuery) -> VolumeDetails:
        """One volume (``GET .../content/{volume}``)."""
        driver, definition, _, volname = await self.pool.volume(query.volid)
        volume = await driver.volume(volname, detail=True)
        guests = await self.guests.guests() if volume.vmid else {}
        return VolumeDetails(volume=self._info(definition.storage, volume, guests))

    # Allocation and removal --------------------------------------------------------------

    async def allocate(self, command: VolumeAllocate) -> VolumeDetails:
        """A new disk for ``vmid``; checked first, removed again if any step fails."""
        driver, definition = await self.pool.driver(command.storage)
        if command.content not in DISK_CONTENT:
            raise invalid(
                f"volumes of content type '{command.content}' are uploaded, not allocated",
                "content",
            )
        check_content(definition, command.content)
        disk = new_disk(
            driver,
            definition,
            vmid=command.vmid,
            size=kib_rounded(command.size),
            fmt=command.format.value if command.format else None,
            filename=command.filename,
            content=command.content,
        )
        if disk.format != DiskFormat.SUBVOL.value:
            if disk.size <= 0:
                raise invalid("a disk needs a size above 0", "size")
            await check_space(driver, disk.size)
        if disk.name is not None:  # a name chosen by the caller may be one a guest still uses
            rbd = definition.storage_type is StorageType.RBD
            volname = disk.name if rbd else f"{disk.vmid}/{disk.name}"
            await self._refuse_running(f"{definition.storage}:{volname}", definition)
        async with self.pool.lock(definition.storage):
            volume = await driver.allocate(disk)
        volid = f"{definition.storage}:{volume.name}"
        log.info("volume_allocated", volid=volid, size=volume.size)
        self._allocated(volid, volume)
        return self._details(definition.storage, volume)

    async def free(self, command: VolumeFree) -> Done:
        """Delete a volume; refused when protected, with linked clones, or (asked) still owned."""
        driver, definition, parsed, volname = await self.pool.volume(command.volid)
        volume = await driver.volume(volname)
        if volume.protected:
            raise invalid(f"volume '{command.volid}' is protected", "volid")
        owned = command.check_owner and parsed.content in DISK_CONTENT
        if owned and parsed.vmid is not None and parsed.vmid in await self.guests.guests():
            raise invalid(
                f"Cannot remove image, a guest with VMID '{parsed.vmid}' exists! "
                "You can delete the image from the guest's hardware pane",
                "volid",
            )
        await self._refuse_running(command.volid, definition)
        async with self.pool.lock(definition.storage):
            await driver.free(volname)
        log.info("volume_freed", volid=command.volid)
        event = VolumeFreed(**self._event(), volid=command.volid, vmid=volume.vmid)
        self.events.emit(VOLUME_FREED.to(node=self.node), event)
        return Done()

    async def resize(self, command: VolumeResize) -> VolumeDetails:
        """Grow a disk; shrinking is refused."""
        driver, definition, _, volname = await self.pool.volume(command.volid)
        volume = await driver.volume(volname)
        size = kib_rounded(command.size)
        if size < volume.size:
            raise invalid(
                f"shrinking disks is not supported ({gib(volume.size)} to {gib(size)})", "size"
            )
        if size == volume.size:
            return self._details(definition.storage, volume)
        await check_space(driver, size - volume.size)
        # A running guest's disk grows through its hypervisor (QEMU block_resize), never under it.
        await self._refuse_running(command.volid, definition)
        async with self.pool.lock(definition.storage):
            volume = await driver.resize(volname, size)
        event = VolumeResized(**self._event(), volid=command.volid, size=volume.size)
        self.events.emit(VOLUME_RESIZED.to(node=self.node), event)
        return self._details(definition.storage, volume)

    async def update(self, command: VolumeUpdate) -> VolumeDetails:
        """Change a volume's notes or protection (``PUT .../content/{volume}``)."""
        driver, definition, _, volname = await self.pool.volume(command.volid)
        async with self.pool.lock(definition.storage):
            volume = await driver.set_attributes(volname, command.notes, command.protected)
        return self._details(definition.storage, volume)

    # Snapshots ---------------------------------------------------------------------------

    async def snapshot_create(self, command: VolumeSnapshotCreate) -> Done:
        """Snapshot one volume."""
        driver, definition, _, volname = await self.pool.volume(command.volid)
        async with self.pool.lock(definition.storage):
            await driver.snapshot_create(volname, command.snapname)
        return Done()

    async def snapshot_rollback(self, command: VolumeSnapshotRollback) -> Done:
        """Roll one volume back to a snapshot."""
        driver, definition, _, volname = await self.pool.volume(command.volid)
        await self._refuse_running(command.volid, definition)
        async with self.pool.lock(definition.storage):
            await driver.snapshot_rollback(volname, command.snapname)
        return Done()

    async def snapshot_delete(self, command: VolumeSnapshotDelete) -> Done:
        """Delete one snapshot; refused while linked clones depend on it."""
        driver, definition, _, volname = await self.pool.volume(command.volid)
        async with self.pool.lock(definition.storage):
            await driver.snapshot_delete(volname, command.snapname)
        return Done()

    # Templates, clones, owners -----------------------------------------------------------

    async def create_base(self, command: VolumeCreateBase) -> VolumeDetails:
        """Turn a disk into a template base, the source of linked clones."""
        driver, definition, parsed, volname = await self.pool.volume(command.volid)
        if parsed.content not in DISK_CONTENT:
            raise invalid(f"'{command.volid}' is not a disk", "volid")
        await self._refuse_running(command.volid, definition)
        async with self.pool.lock(definition.storage):
            volume = await driver.create_base(volname)
        new_volid = f"{definition.storage}:{volume.name}"
        event = VolumeRenamed(
            **self._event(), volid=command.volid, new_volid=new_volid, vmid=volume.vmid or 0
        )
        self.events.emit(VOLUME_RENAMED.to(node=self.node), event)
        return self._details(definition.storage, volume)

    async def clone(self, command: VolumeClone) -> VolumeDetails:
        """A linked clone of a base (same storage) or a full copy (any storage this node uses)."""
        driver, definition, parsed, volname = await self.pool.volume(command.volid)
        if parsed.content not in DISK_CONTENT:
            raise invalid(f"'{command.volid}' is not a disk", "volid")
        if not command.linked:
            volume, storage = await self.copier.full_copy(
                command.volid,
                vmid=command.vmid,
                storage=command.storage,
                fmt=command.format.value if command.format else None,
                filename=command.filename,
                snapname=command.snapname,
            )
        else:
            if command.storage not in (None, definition.storage):
                raise invalid("a linked clone stays on the storage of its base", "storage")
            linked_format = driver.formats(ContentType.IMAGES)
            wanted = DiskFormat.QCOW2.value if DiskFormat.QCOW2.value in linked_format else "raw"
            if command.format is not None and command.format.value != wanted:
                raise invalid(f"a linked clone here is always {wanted}", "format")
            target = None
            if command.filename is not None:
                target, _ = volnames.requested_name(
                    definition.storage_type, command.vmid, command.filename, wanted
                )
            async with self.pool.lock(definition.storage):
                volume = await driver.clone_linked(volname, command.snapname, command.vmid, target)
            storage = definition.storage
        volid = f"{storage}:{volume.name}"
        log.info("volume_cloned", source=command.volid, volid=volid, linked=command.linked)
        self._allocated(volid, volume, source=command.volid)
        return self._details(storage, volume)

    async def rename(self, command: VolumeRename) -> VolumeDetails:
        """Give a disk to another owner (``vm-<vmid>-...``), as a restore or reassign does."""
        driver, definition, parsed, volname = await self.pool.volume(command.volid)
        if parsed.content not in DISK_CONTENT:
            raise invalid(f"'{command.volid}' is not a disk", "volid")
        target = None
        if command.filename is not None:
            target, _ = volnames.requested_name(
                definition.storage_type, command.vmid, command.filename, parsed.format
            )
        await self._refuse_running(command.volid, definition)
        async with self.pool.lock(definition.storage):
            volume = await driver.rename(volname, command.vmid, target)
        new_volid = f"{definition.storage}:{volume.name}"
        event = VolumeRenamed(
            **self._event(), volid=command.volid, new_volid=new_volid, vmid=command.vmid
        )
        self.events.emit(VOLUME_RENAMED.to(node=self.node), event)
        return self._details(definition.storage, volume)

    async def map(self, command: VolumeMap) -> VolumeMapping:
        """Where the hypervisor finds a volume, and its disk definitions."""
        driver, _, _, volname = await self.pool.volume(command.volid)
        return await driver.map(volname)

    async def unmap(self, command: VolumeUnmap) -> Done:
        """Nothing stays mapped: files are opened in place, RBD through librbd in QEMU."""
        driver, _, _, volname = await self.pool.volume(command.volid)
        await driver.volume(volname)
        return Done()

    async def publish_status(self) -> None:
        """Publish every storage this node uses with its usage (scheduler, cluster resources)."""
        report = await self.status(StorageStatusQuery())
        event = StorageStatusPublished(**self._event(), storages=report.storages)
        self.events.emit(STATUS_PUBLISHED.to(node=self.node), event)

    # Orphans -----------------------------------------------------------------------------

    async def orphans(self, query: OrphanQuery) -> OrphanReport:
        """Disks whose owner guest does not exist: reported (and published), never deleted."""
        if query.storage is not None:
            storages = [query.storage]
        else:
            storages = [
                record.definition.storage
                for record in await self.pool.book.all()
                if applies_to(record.definition, self.node) and not record.definition.disable
            ]
        guests = await self.guests.guests()
        found: list[VolumeInfo] = []
        for storage in storages:
            driver, definition = await self.pool.driver(storage)
            found.extend(
                self._info(definition.storage, volume, guests)
                for volume in await driver.list_volumes(ContentType.IMAGES)
                if volume.vmid is not None and volume.vmid not in guests
            )
        for info in found:
            event = VolumeOrphanFound(
                **self._event(),
                volid=info.volid,
                vmid=info.vmid,
                detail=f"no guest {info.vmid} in the guest registry",
            )
            self.events.emit(VOLUME_ORPHAN_FOUND.to(node=self.node), event)
        if found:
            log.warning("orphan_volumes_found", volids=[info.volid for info in found])
        return OrphanReport(volumes=tuple(found))
