"""Full copies of disks: within one storage by its driver, across storages through a raw file."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import structlog

from rucher.proto.storage import ContentType
from rucher.storage.checks import check_content, check_space, new_disk
from rucher.storage.drivers.interface import Volume
from rucher.storage.pool import DriverPool
from rucher.storage.volnames import invalid

log = structlog.get_logger("rucher.storage.copies")


class Copier:
    """Copies a disk (or one of its snapshots) in full for a new owner."""

    def __init__(self, pool: DriverPool, staging: Path) -> None:
        self.pool = pool
        self.staging = staging

    async def full_copy(
        self,
        volid: str,
        *,
        vmid: int,
        storage: str | None,
        fmt: str | None,
        filename: str | None,
        snapname: str | None,
    ) -> tuple[Volume, str]:
        """Copy ``volid`` to ``storage`` (its own when None); returns the copy and its storage.

        Across storages the data travels through a sparse raw file in the staging folder, which
        is removed whatever happens; a copy that fails midway leaves no target behind.
        """
        source_driver, source_definition, parsed, volname = await self.pool.volume(volid)
        if parsed.content not in (ContentType.IMAGES, ContentType.ROOTDIR):
            raise invalid(f"'{volid}' is not a disk", "volid")
        source = await source_driver.volume(volname)
        target_storage = storage or source_definition.storage
        target_driver, target_definition = await self.pool.driver(target_storage)
        check_content(target_definition, ContentType.IMAGES)
        usable = target_driver.formats(ContentType.IMAGES)
        wanted = fmt or (source.format if source.format in usable else None)
        disk = new_disk(
            target_driver, target_definition, vmid=vmid, size=source.size, fmt=wanted,
            filename=filename,
        )  # fmt: skip
        await check_space(target_driver, source.size)
        if target_storage == source_definition.storage:
            async with self.pool.lock(target_storage):
                return await target_driver.copy(volname, snapname, disk), target_storage
        staged = self.staging / f"copy-{uuid.uuid4().hex}.raw"
        await asyncio.to_thread(self.staging.mkdir, parents=True, exist_ok=True)
        try:
            await source_driver.export_raw(volname, snapname, staged)
            async with self.pool.lock(target_storage):
                volume = await target_driver.import_raw(staged, disk)
        finally:
            await asyncio.to_thread(staged.unlink, missing_ok=True)
        log.info("volume_copied", source=volid, target=f"{target_storage}:{volume.name}")
        return volume, target_storage
