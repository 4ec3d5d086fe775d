"""The ``rbd`` driver: Ceph RBD images in one pool, through the ``rados`` and ``rbd`` bindings.

Images have the layering feature; a template base is ``base-...`` with a protected ``__base__``
snapshot, and a linked clone is a copy-on-write child of it (``base-100-disk-0/vm-101-disk-0``).
Usage comes from the cluster (``df``: the pool's stored bytes and what may still be stored).
Every librados/librbd call is blocking: each operation runs as one function in a worker thread.
The bindings are Debian's (``python3-rados``, ``python3-rbd``) and load on first use only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

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
from rucher.storage.disks import monitor_hosts, rbd_mapping
from rucher.storage.drivers.ceph import CephPool
from rucher.storage.drivers.interface import Capacity, NewDisk, Volume
from rucher.storage.revert import Revert
from rucher.storage.volnames import invalid

log = structlog.get_logger("rucher.storage.rbd")

TYPE = StorageType.RBD
BASE_SNAPSHOT = "__base__"
NOTES_KEY, PROTECTED_KEY = "rucher.notes", "rucher.protected"
CHUNK = 4 << 20


class RbdDriver:
    """Images in ``definition.pool`` of the cluster at ``definition.monhost``."""

    def __init__(
        self,
        definition: StorageDefinition,
        *,
        key: str | None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.definition = definition
        self.ceph = CephPool(definition, key, settings or {})
        self.pool, self.username, self.key = self.ceph.pool, self.ceph.username, key
        self._rbd = self.ceph.rbd
        self._run = self.ceph.run
        self._image = self.ceph.image
        self._features = self._rbd.RBD_FEATURE_LAYERING
        # Sizes of template bases' snapshots: a base is never resized, so a clone need not open
        # its base again. Entries go when a base is freed or renamed, here or on another node.
        self._base_sizes: dict[tuple[str, str], int] = {}

    def forget(self, name: str) -> None:
        """Drop what is cached about a volume (freed or renamed here or elsewhere)."""
        image = volnames.parse(TYPE, name).name
        for key in [key for key in self._base_sizes if key[0] == image]:
            del self._base_sizes[key]

    # Names --------------------------------------------------------------------------------

    def _volid(self, name: str) -> str:
        return f"{self.definition.storage}:{name}"

    def _not_found(self, name: str) -> RucherError:
        return RucherError(
            ErrorCode.NOT_FOUND,
            f"volume '{self._volid(name)}' does not exist",
            details={"field": "volid"},
        )

    def formats(self, content: ContentType) -> tuple[str, ...]:
        """RBD images are raw."""
        return (DiskFormat.RAW.value,)

    def _describe(self, ioctx: Any, image_name: str) -> Volume:
        vol = volnames.parse(TYPE, image_name)
        with self._image(ioctx, image_name, read_only=True) as image:
            size = image.size()
            parent = None
            try:
                parent_pool, parent_image, _ = image.parent_info()
            except self._rbd.ImageNotFound:
                parent_pool = parent_image = None
            if parent_image is not None and parent_pool == self.pool:
                parent = parent_image
            metadata = dict(image.metadata_list())
        name = f"{parent}/{image_name}" if parent else image_name
        return Volume(
            name=name,
            content=vol.content,
            format=DiskFormat.RAW.value,
            size=size,
            vmid=vol.vmid,
            parent=parent,
            protected=metadata.get(PROTECTED_KEY) == "1",
            notes=metadata.get(NOTES_KEY, ""),
        )

    def _image_name(self, name: str) -> str:
        """The image behind a volume name (a linked clone's name also names its base)."""
        return volnames.parse(TYPE, name).name

    # Reading -----------------------------------------------------------------------------

    async def status(self) -> Capacity:
        """The pool's stored bytes and what may still be stored, from the cluster's ``df``."""

        def measure(_ioctx: Any) -> Capacity:
            stats = self.ceph.df()
            if stats is None:
                return Capacity(total=0, used=0, avail=0, active=False)
            used, avail = int(stats["stored"]), int(stats["max_avail"])
            return Capacity(total=used + avail, used=used, avail=avail)

        try:
            return await self._run("ceph df", measure)
        except RucherError as err:
            log.warning("rbd_status_failed", storage=self.definition.storage, error=err.message)
            return Capacity(total=0, used=0, avail=0, active=False)

    async def list_volumes(
        self, content: ContentType | None = None, vmid: int | None = None
    ) -> list[Volume]:
        """Every image that is a disk (``vm-``/``base-``), optionally of one owner."""
        if content not in (None, ContentType.IMAGES, ContentType.ROOTDIR):
            return []

        def scan(ioctx: Any) -> list[Volume]:
            found = []
            for image_name in sorted(self._rbd.RBD().list(ioctx)):
                try:
                    vol = volnames.parse(TYPE, image_name)
                except RucherError:
                    continue  # an image Rucher did not name
                if vmid is not None and vol.vmid != vmid:
                    continue
                with contextlib.suppress(self._rbd.ImageNotFound):  # removed meanwhile
                    found.append(self._describe(ioctx, image_name))
            return found

        return await self._run("list images", scan)

    def _used(self, ioctx: Any, image_name: str) -> int:
        """Bytes the image itself holds, as ``rbd du`` counts them.

        One ``diff_iterate`` over whole objects from the image's creation: librbd lists the
        image's data objects (or reads the object map where there is one) instead of reading
        data, and leaves out what a linked clone still shares with its base.
        """
        used = 0

        def count(_offset: int, length: int, exists: bool) -> None:
            nonlocal used
            if exists:
                used += length

        with self._image(ioctx, image_name, read_only=True) as image:
            image.diff_iterate(
                0, image.size(), None, count, include_parent=False, whole_object=True
            )
        return used

    def _path(self, image_name: str) -> str:
        """``pvesm path`` of an image: QEMU's ``rbd:`` spec, without the cephx secret."""
        monitors = ";".join(
            f"{host}:{port}" if port else host
            for host, port in monitor_hosts(self.definition.monhost)
        )
        spec = f"{self.pool}/{image_name}"
        return f"rbd:{spec}:mon_host={monitors}:auth_supported=cephx:id={self.username}"

    async def volume(self, name: str, *, detail: bool = False) -> Volume:
        """One image; with ``detail`` also its usage from the cluster and its path."""
        image_name = self._image_name(name)

        def read(ioctx: Any) -> Volume:
            try:
                volume = self._describe(ioctx, image_name)
                if detail:
                    used = self._used(ioctx, image_name)
                    volume = replace(volume, used=used, path=self._path(image_name))
            except self._rbd.ImageNotFound as err:
                raise self._not_found(name) from err
            return volume

        return await self._run(f"open {name}", read)

    async def snapshots(self, name: str) -> list[str]:
        """An image's snapshots, oldest first."""
        image_name = self._image_name(name)

        def read(ioctx: Any) -> list[str]:
            with self._image(ioctx, image_name, read_only=True) as image:
                return [snap["name"] for snap in image.list_snaps()]

        return await self._run(f"snapshots of {name}", read)

    def _children(self, ioctx: Any, image_name: str, only: str | None = None) -> list[str]:
        found = []
        with self._image(ioctx, image_name, read_only=True) as image:
            snaps = [snap["name"] for snap in image.list_snaps()]
        for snap in snaps:
            if only is not None and snap != only:
                continue
            with self._image(ioctx, image_name, snapshot=snap, read_only=True) as image:
                for child in image.list_children2():
                    spec = (f"{image_name}/{child['image']}" if child["pool"] == self.pool
                            else f"{child['pool']}/{child['image']}")  # fmt: skip
                    found.append(self._volid(spec))
        return found

    async def children(self, name: str) -> list[str]:
        """Clones of any of the image's snapshots."""
        image_name = self._image_name(name)
        return await self._run(f"children of {name}", lambda io: self._children(io, image_name))

    # Creating ----------------------------------------------------------------------------

    def _create_named(self, ioctx: Any, disk: NewDisk, make: Callable[[str], None]) -> str:
        """Run ``make(name)`` with the requested name, or the next free one (racing nodes)."""
        if disk.name is not None:
            try:
                make(disk.name)
            except self._rbd.ImageExists as err:
                raise RucherError(
                    ErrorCode.EXISTS,
                    f"volume '{self._volid(disk.name)}' already exists",
                    details={"field": "filename"},
                ) from err
            return disk.name
        taken = set(self._rbd.RBD().list(ioctx))
        for index in range(10_000):
            candidate = volnames.disk_name(TYPE, disk.vmid, index, DiskFormat.RAW.value)
            if {candidate, candidate.replace("vm-", "base-", 1)} & taken:
                continue
            try:
                make(candidate)
            except self._rbd.ImageExists:
                continue  # another node took it meanwhile
            return candidate
        raise RucherError(ErrorCode.INTERNAL, f"no free disk name for VM {disk.vmid}")

    async def allocate(self, disk: NewDisk) -> Volume:
        """A new image with the layering feature."""

        def create(ioctx: Any) -> Volume:
            def make(name: str) -> None:
                self._rbd.RBD().create(
                    ioctx, name, disk.size, old_format=False, features=self._features
                )

            name = self._create_named(ioctx, disk, make)
            return Volume(
                name=name,
                content=ContentType.IMAGES,
                format=DiskFormat.RAW.value,
                size=disk.size,
                vmid=disk.vmid,
            )

        return await self._run("create image", create)

    async def clone_linked(
        self, name: str, snapshot: str | None, vmid: int, target: str | None
    ) -> Volume:
        """A copy-on-write clone of a base's ``__base__`` (or ``snapshot``) snapshot."""
        vol = volnames.parse(TYPE, name)
        if not vol.is_base:
            raise invalid(f"clone_image only works on base images, not '{name}'")
        snap = snapshot or BASE_SNAPSHOT
        disk = NewDisk(vmid=vmid, size=0, format=DiskFormat.RAW.value, name=target)

        def base_size(ioctx: Any) -> int:
            with self._image(ioctx, vol.name, snapshot=snap, read_only=True) as base:
                if snap != BASE_SNAPSHOT and not base.is_protected_snap(snap):
                    with self._image(ioctx, vol.name) as writable:
                        writable.protect_snap(snap)  # clones need a protected snapshot
                return int(base.size())

        def clone(ioctx: Any) -> str:
            def make(child: str) -> None:
                self._rbd.RBD().clone(ioctx, vol.name, snap, ioctx, child, features=self._features)

            return self._create_named(ioctx, disk, make)

        what = f"clone {name}@{snap}"
        try:
            size = self._base_sizes.get((vol.name, snap))
            if size is None:  # also protects a named snapshot, before any clone of it
                size = await self._run(what, base_size)
                self._base_sizes[(vol.name, snap)] = size
            child = await self._run(what, clone)
        except RucherError as err:
            if err.code is ErrorCode.NOT_FOUND:
                self.forget(name)
                raise RucherError(
                    ErrorCode.NOT_FOUND,
                    f"base '{self._volid(name)}' or its snapshot '{snap}' does not exist",
                    details={"field": "snapname" if snapshot else "volid"},
                ) from err
            raise
        return Volume(
            name=f"{vol.name}/{child}",
            content=ContentType.IMAGES,
            format=DiskFormat.RAW.value,
            size=size,
            vmid=vmid,
            parent=vol.name,
        )

    async def copy(self, name: str, snapshot: str | None, disk: NewDisk) -> Volume:
        """A full, independent copy (``rbd copy``) of an image or one of its snapshots."""
        image_name = self._image_name(name)

        def copy(ioctx: Any) -> Volume:
            with self._image(ioctx, image_name, snapshot=snapshot, read_only=True) as source:
                size = source.size()

                def make(target: str) -> None:
                    source.copy(ioctx, target, features=self._features)

                target = self._create_named(ioctx, disk, make)
            return Volume(
                name=target,
                content=ContentType.IMAGES,
                format=DiskFormat.RAW.value,
                size=size,
                vmid=disk.vmid,
            )

        return await self._run(f"copy {name}", copy)

    async def export_raw(self, name: str, snapshot: str | None, target: Path) -> None:
        """Read the image in 4 MiB chunks into a sparse raw file."""
        image_name = self._image_name(name)

        def export(ioctx: Any) -> None:
            with (
                self._image(ioctx, image_name, snapshot=snapshot, read_only=True) as image,
                target.open("wb") as out,
            ):
                size = image.size()
                out.truncate(size)
                for offset in range(0, size, CHUNK):
                    data = image.read(offset, min(CHUNK, size - offset))
                    if data.count(0) != len(data):
                        out.seek(offset)
                        out.write(data)

        await self._run(f"export {name}", export)

    async def import_raw(self, source: Path, disk: NewDisk) -> Volume:
        """A new image written from a raw file, skipping zero chunks; removed if writing fails."""
        size = (await asyncio.to_thread(source.stat)).st_size
        created = await self.allocate(NewDisk(disk.vmid, max(size, disk.size), "raw", disk.name))
        async with Revert() as revert:
            revert.add(f"remove {created.name}", lambda: self._remove(created.name))

            def write(ioctx: Any) -> None:
                with self._image(ioctx, created.name) as image, source.open("rb") as data:
                    for offset in range(0, size, CHUNK):
                        chunk = data.read(CHUNK)
                        if chunk.count(0) != len(chunk):
                            image.write(chunk, offset)

            await self._run(f"write {created.name}", write)
        return created

    # Changing ----------------------------------------------------------------------------

    async def _remove(self, image_name: str) -> None:
        def remove(ioctx: Any) -> None:
            with self._image(ioctx, image_name) as image:
                for snap in list(image.list_snaps()):
                    if image.is_protected_snap(snap["name"]):
                        image.unprotect_snap(snap["name"])
                    image.remove_snap(snap["name"])
            self._rbd.RBD().remove(ioctx, image_name)

        await self._run(f"remove {image_name}", remove)

    async def free(self, name: str) -> None:
        """Remove the image and its snapshots; refused while clones depend on it."""
        vol = volnames.parse(TYPE, name)
        try:
            clones = await self.children(name)
        except RucherError as err:
            if err.code is ErrorCode.NOT_FOUND:
                raise self._not_found(name) from err
            raise
        if clones:
            raise _in_use(self._volid(name), clones)
        self.forget(name)
        await self._remove(vol.name)

    async def resize(self, name: str, size: int) -> Volume:
        """Grow the image (never shrink)."""
        vol = volnames.parse(TYPE, name)
        if vol.is_base:
            raise invalid(f"cannot resize base volume '{self._volid(name)}'")

        def grow(ioctx: Any) -> Volume:
            with self._image(ioctx, vol.name) as image:
                image.resize(size, allow_shrink=False)
            return self._describe(ioctx, vol.name)

        return await self._run(f"resize {name}", grow)

    async def snapshot_create(self, name: str, snapshot: str) -> None:
        """An RBD snapshot."""
        image_name = self._image_name(name)

        def create(ioctx: Any) -> None:
            with self._image(ioctx, image_name) as image:
                if any(snap["name"] == snapshot for snap in image.list_snaps()):
                    raise RucherError(
                        ErrorCode.EXISTS,
                        f"snapshot '{snapshot}' of '{self._volid(name)}' already exists",
                        details={"field": "snapname"},
                    )
                image.create_snap(snapshot)

        await self._run(f"snapshot {name}", create)

    def _check_snapshot(self, image: Any, name: str, snapshot: str) -> None:
        if not any(snap["name"] == snapshot for snap in image.list_snaps()):
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"snapshot '{snapshot}' of '{self._volid(name)}' does not exist",
                details={"field": "snapname"},
            )

    async def snapshot_rollback(self, name: str, snapshot: str) -> None:
        """Roll the image back to a snapshot."""
        image_name = self._image_name(name)

        def rollback(ioctx: Any) -> None:
            with self._image(ioctx, image_name) as image:
                self._check_snapshot(image, name, snapshot)
                image.rollback_to_snap(snapshot)

        await self._run(f"roll back {name}", rollback)

    async def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Delete a snapshot; a protected one with clones is refused, naming them."""
        image_name = self._image_name(name)

        def delete(ioctx: Any) -> None:
            with self._image(ioctx, image_name) as image:
                self._check_snapshot(image, name, snapshot)
                if image.is_protected_snap(snapshot):
                    clones = self._children(ioctx, image_name, only=snapshot)
                    if clones:
                        raise _in_use(f"{self._volid(name)}@{snapshot}", clones, "snapname")
                    image.unprotect_snap(snapshot)
                image.remove_snap(snapshot)

        await self._run(f"delete snapshot of {name}", delete)

    async def create_base(self, name: str) -> Volume:
        """Rename ``vm-`` to ``base-``, then snapshot and protect ``__base__``."""
        vol = volnames.parse(TYPE, name)
        if vol.is_base:
            raise invalid(f"'{self._volid(name)}' is already a base volume")
        base_name = vol.name.replace("vm-", "base-", 1)
        self.forget(base_name)

        def make_base(ioctx: Any) -> Volume:
            self._rbd.RBD().rename(ioctx, vol.name, base_name)
            try:
                with self._image(ioctx, base_name) as image:
                    image.create_snap(BASE_SNAPSHOT)
                    image.protect_snap(BASE_SNAPSHOT)
            except self._rbd.Error:
                self._rbd.RBD().rename(ioctx, base_name, vol.name)  # undo: no half template
                raise
            return self._describe(ioctx, base_name)

        return await self._run(f"make {name} a base", make_base)

    async def rename(self, name: str, vmid: int, target: str | None) -> Volume:
        """Give the image a new owner's name; a linked clone keeps its base."""
        vol = volnames.parse(TYPE, name)
        if vol.is_base:
            raise invalid(f"base volume '{self._volid(name)}' cannot change owner")
        disk = NewDisk(vmid=vmid, size=0, format=DiskFormat.RAW.value, name=target)

        def move(ioctx: Any) -> Volume:
            def make(new_name: str) -> None:
                self._rbd.RBD().rename(ioctx, vol.name, new_name)

            return self._describe(ioctx, self._create_named(ioctx, disk, make))

        return await self._run(f"rename {name}", move)

    async def set_attributes(self, name: str, notes: str | None, protected: bool | None) -> Volume:
        """Keep notes and protection in the image's metadata."""
        image_name = self._image_name(name)

        def change(ioctx: Any) -> Volume:
            with self._image(ioctx, image_name) as image:
                for key, value in ((NOTES_KEY, notes), (PROTECTED_KEY, protected)):
                    if value is None:
                        continue
                    if value is False or value == "":
                        with contextlib.suppress(KeyError, self._rbd.ImageNotFound):
                            image.metadata_remove(key)
                    else:
                        image.metadata_set(key, "1" if value is True else str(value))
            return self._describe(ioctx, image_name)

        return await self._run(f"change {name}", change)

    async def map(self, name: str) -> VolumeMapping:
        """The ``pool/image`` spec QEMU opens through librbd, with the cephx identity."""
        volume = await self.volume(name)
        image_name = self._image_name(volume.name)
        return rbd_mapping(
            self._volid(volume.name), self.definition, image_name, self.username, self.key or ""
        )

    async def file_target(self, content: ContentType, filename: str) -> Path:
        """RBD holds no files."""
        raise RucherError(
            ErrorCode.INVALID,
            f"storage '{self.definition.storage}' does not support content type '{content}'",
            details={"field": "content"},
        )

    async def close(self) -> None:
        """Close the pool and the cluster connection."""
        await self.ceph.close()


def _in_use(volid: str, clones: list[str], field: str = "volid") -> RucherError:
    return RucherError(
        ErrorCode.INVALID,
        f"'{volid}' is still in use by linked clones: {', '.join(clones)}",
        details={"field": field, "clones": clones},
    )
