"""An in-memory storage driver for unit tests of the service's logic (never used in production).

It keeps volumes, snapshots and linked clones in dictionaries, reports a fixed capacity, and
fails on demand (``fail_on``) so tests can check what the service does when a step breaks.
Names follow the storage type's Proxmox naming, as the real drivers' do.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import (
    ContentType,
    DiskFormat,
    StorageDefinition,
    StorageType,
    VolumeMapping,
)
from rucher.storage import volnames
from rucher.storage.disks import file_mapping
from rucher.storage.drivers.interface import Capacity, NewDisk, Volume
from rucher.storage.volnames import invalid


class FakeDriver:
    """Volumes in memory; ``capacity`` is what :meth:`status` reports."""

    def __init__(self, definition: StorageDefinition, *, capacity: int = 100 << 30) -> None:
        self.definition = definition
        self.type = definition.storage_type
        self.capacity = capacity
        self.volumes: dict[str, Volume] = {}
        self.snaps: dict[str, list[str]] = {}
        self.files: dict[str, bytes] = {}
        self.fail_on: set[str] = set()
        self.calls: list[str] = []
        self.closed = False

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail_on:
            raise RucherError(ErrorCode.INTERNAL, f"{name} failed (injected)")

    def _get(self, name: str) -> Volume:
        image = volnames.parse(self.type, name).name
        for volume in self.volumes.values():
            if volnames.parse(self.type, volume.name).name == image:
                return volume
        raise RucherError(
            ErrorCode.NOT_FOUND,
            f"volume '{self.definition.storage}:{name}' does not exist",
            details={"field": "volid"},
        )

    def _free_name(self, vmid: int, fmt: str) -> str:
        taken = {volnames.parse(self.type, v.name).stem for v in self.volumes.values()}
        index = 0
        while f"vm-{vmid}-disk-{index}" in taken or f"base-{vmid}-disk-{index}" in taken:
            index += 1
        return volnames.disk_name(self.type, vmid, index, fmt)

    def _store(self, disk: NewDisk, size: int, parent: str | None = None) -> Volume:
        name = disk.name or self._free_name(disk.vmid, disk.format)
        vol = volnames.parse(
            self.type, name if self.type is StorageType.RBD else f"{disk.vmid}/{name}"
        )
        if parent is not None:
            base = volnames.parse(self.type, parent)
            vol = replace(vol, base=base.name, base_vmid=base.vmid)
        full = volnames.build(self.type, vol)
        if any(volnames.parse(self.type, v).name == vol.name for v in self.volumes):
            raise RucherError(
                ErrorCode.EXISTS,
                f"volume '{self.definition.storage}:{full}' already exists",
                details={"field": "filename"},
            )
        volume = Volume(
            name=full,
            content=vol.content,
            format=disk.format,
            size=size,
            vmid=disk.vmid,
            parent=parent,
        )
        self.volumes[full] = volume
        self.snaps[full] = []
        return volume

    def formats(self, content: ContentType) -> tuple[str, ...]:
        """Dir formats, or raw only on rbd."""
        if self.type is StorageType.RBD:
            return (DiskFormat.RAW.value,)
        return volnames.IMAGE_FORMATS

    async def status(self) -> Capacity:
        """The fixed capacity less what the volumes use."""
        self._step("status")
        used = sum(volume.size for volume in self.volumes.values() if volume.parent is None)
        return Capacity(total=self.capacity, used=used, avail=max(0, self.capacity - used))

    async def list_volumes(
        self, content: ContentType | None = None, vmid: int | None = None
    ) -> list[Volume]:
        """Every volume, optionally of one owner."""
        return sorted(
            (v for v in self.volumes.values() if vmid is None or v.vmid == vmid),
            key=lambda volume: volume.name,
        )

    async def volume(self, name: str, *, detail: bool = False) -> Volume:
        """One volume, with the made-up path :meth:`map` gives."""
        volume = self._get(name)
        return replace(volume, path=f"/fake/{self.definition.storage}/{volume.name}")

    async def allocate(self, disk: NewDisk) -> Volume:
        """Claim the name, then 'write' the disk (the step ``fail_on`` can break)."""
        volume = self._store(disk, disk.size)
        try:
            self._step("allocate")
        except RucherError:
            del self.volumes[volume.name]
            raise
        return volume

    async def free(self, name: str) -> None:
        """Remove a volume; refused with clones."""
        volume = self._get(name)
        clones = await self.children(volume.name)
        if clones:
            raise invalid(
                f"base volume is still in use by linked clones: {', '.join(clones)}", "volid"
            )
        self._step("free")
        del self.volumes[volume.name]

    async def resize(self, name: str, size: int) -> Volume:
        """Change the recorded size."""
        volume = self._get(name)
        self._step("resize")
        self.volumes[volume.name] = replace(volume, size=size)
        return self.volumes[volume.name]

    async def snapshot_create(self, name: str, snapshot: str) -> None:
        """Record a snapshot."""
        volume = self._get(name)
        if snapshot in self.snaps[volume.name]:
            raise RucherError(ErrorCode.EXISTS, "snapshot exists", details={"field": "snapname"})
        self.snaps[volume.name].append(snapshot)

    async def snapshot_rollback(self, name: str, snapshot: str) -> None:
        """Check the snapshot exists."""
        if snapshot not in self.snaps[self._get(name).name]:
            raise RucherError(ErrorCode.NOT_FOUND, "no snapshot", details={"field": "snapname"})
        self._step("rollback")

    async def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Forget a snapshot."""
        volume = self._get(name)
        if snapshot not in self.snaps[volume.name]:
            raise RucherError(ErrorCode.NOT_FOUND, "no snapshot", details={"field": "snapname"})
        self.snaps[volume.name].remove(snapshot)

    async def snapshots(self, name: str) -> list[str]:
        """Recorded snapshots."""
        return list(self.snaps[self._get(name).name])

    async def children(self, name: str) -> list[str]:
        """Volumes whose parent is this one."""
        image = volnames.parse(self.type, name).name
        return sorted(
            f"{self.definition.storage}:{v.name}"
            for v in self.volumes.values()
            if v.parent is not None and volnames.parse(self.type, v.parent).name == image
        )

    async def create_base(self, name: str) -> Volume:
        """Rename vm- to base-."""
        volume = self._get(name)
        del self.volumes[volume.name]
        based = volume.name.replace("vm-", "base-", 1)
        self.volumes[based] = replace(volume, name=based)
        self.snaps[based] = self.snaps.pop(volume.name)
        return self.volumes[based]

    async def clone_linked(
        self, name: str, snapshot: str | None, vmid: int, target: str | None
    ) -> Volume:
        """A child of a base."""
        base = self._get(name)
        if not volnames.parse(self.type, base.name).is_base:
            raise invalid(f"clone_image only works on base images, not '{name}'")
        self._step("clone_linked")
        fmt = DiskFormat.RAW.value if self.type is StorageType.RBD else DiskFormat.QCOW2.value
        return self._store(NewDisk(vmid, 0, fmt, target), base.size, parent=base.name)

    async def copy(self, name: str, snapshot: str | None, disk: NewDisk) -> Volume:
        """A full copy."""
        source = self._get(name)
        self._step("copy")
        return self._store(disk, source.size)

    async def export_raw(self, name: str, snapshot: str | None, target: Path) -> None:
        """Write the volume's size in bytes to ``target`` as its 'content'."""
        volume = self._get(name)
        self._step("export_raw")
        await asyncio.to_thread(target.write_bytes, str(volume.size).encode())

    async def import_raw(self, source: Path, disk: NewDisk) -> Volume:
        """Read a size written by :meth:`export_raw` from another fake."""
        volume = self._store(disk, int(await asyncio.to_thread(source.read_bytes)))
        try:
            self._step("import_raw")
        except RucherError:
            del self.volumes[volume.name]
            raise
        return volume

    async def rename(self, name: str, vmid: int, target: str | None) -> Volume:
        """Move a volume to another owner."""
        volume = self._get(name)
        if volnames.parse(self.type, volume.name).is_base:
            raise invalid("base volume cannot change owner")
        moved = self._store(NewDisk(vmid, volume.size, volume.format, target), volume.size,
                            parent=volume.parent)  # fmt: skip
        del self.volumes[volume.name]
        return moved

    async def set_attributes(self, name: str, notes: str | None, protected: bool | None) -> Volume:
        """Change notes and protection."""
        volume = self._get(name)
        changed = replace(
            volume,
            notes=volume.notes if notes is None else notes,
            protected=volume.protected if protected is None else protected,
        )
        self.volumes[volume.name] = changed
        return changed

    async def map(self, name: str) -> VolumeMapping:
        """A made-up file path."""
        volume = self._get(name)
        path = f"/fake/{self.definition.storage}/{volume.name}"
        return file_mapping(
            f"{self.definition.storage}:{volume.name}", path, volume.format, volume.content
        )

    async def file_target(self, content: ContentType, filename: str) -> Path:
        """Files are not kept by the fake."""
        raise RucherError(ErrorCode.UNSUPPORTED, "the fake driver keeps no files")

    def forget(self, name: str) -> None:
        """Nothing is cached."""

    async def close(self) -> None:
        """Mark closed."""
        self.closed = True
