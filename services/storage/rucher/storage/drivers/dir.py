"""The ``dir`` driver: qcow2, raw and vmdk files under a folder, in Proxmox's layout.

``images/<vmid>/`` holds disks, ``template/iso/`` ISO images, ``template/cache/`` container
templates, ``dump/`` backups, ``snippets/`` snippets. Snapshots are qcow2 internal snapshots;
a linked clone is a qcow2 overlay whose backing file is ``../<basevmid>/base-...``; a template
base is read-only. Notes and protection are ``<file>.notes`` and ``<file>.protected`` beside the
volume, as Proxmox keeps them for backups. Files are changed by ``qemu-img`` (asyncio
subprocesses); reading headers and stat calls run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

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
from rucher.storage.drivers.qemu_img import QemuImg, read_qcow2_header
from rucher.storage.revert import Revert
from rucher.storage.volnames import FILE_FOLDERS, VolName, invalid

_BACKING = re.compile(r"^\.\./(\d+)/([^/]+)$")
_CONTENT_FOLDERS = ("images", *FILE_FOLDERS.values())
NOTES, PROTECTED = ".notes", ".protected"
TYPE = StorageType.DIR
T = TypeVar("T")


def _not_found(volid: str) -> RucherError:
    return RucherError(
        ErrorCode.NOT_FOUND, f"volume '{volid}' does not exist", details={"field": "volid"}
    )


class DirDriver:
    """Volumes as files under ``path`` (see the module docstring)."""

    def __init__(self, definition: StorageDefinition, *, path: Path, qemu_img: QemuImg) -> None:
        self.definition = definition
        self.path = path
        self.qemu_img = qemu_img
        self._ready = False

    # Names and paths ---------------------------------------------------------------------

    def _volid(self, vol: VolName) -> str:
        return f"{self.definition.storage}:{volnames.build(TYPE, vol)}"

    def _file(self, vol: VolName) -> Path:
        if vol.content in FILE_FOLDERS:
            return self.path / FILE_FOLDERS[vol.content] / vol.name
        return self.path / "images" / str(vol.vmid) / vol.name

    def _existing(self, name: str) -> tuple[VolName, Path]:
        vol = volnames.parse(TYPE, name)
        path = self._file(vol)
        if not path.exists():
            raise _not_found(self._volid(vol))
        return vol, path

    def formats(self, content: ContentType) -> tuple[str, ...]:
        """Raw first (Proxmox's default on dir), then qcow2 and vmdk; subvolumes for containers."""
        if content is ContentType.ROOTDIR:
            return (DiskFormat.RAW.value, DiskFormat.QCOW2.value, DiskFormat.SUBVOL.value)
        return volnames.IMAGE_FORMATS

    def _activate(self) -> None:
        if not self._ready:
            for folder in _CONTENT_FOLDERS:
                (self.path / folder).mkdir(parents=True, exist_ok=True)
            self._ready = True

    # Reading -----------------------------------------------------------------------------

    def _describe(self, vol: VolName, path: Path) -> Volume:
        """A volume from its file: size and backing from the qcow2 header, sidecars for the rest."""
        info = path.stat()
        size, parent = info.st_size, None
        if vol.format == DiskFormat.QCOW2.value:
            header = read_qcow2_header(path)
            if header is not None:
                size = header.size
                if header.backing_file and (match := _BACKING.match(header.backing_file)):
                    base = VolName(vol.content, match[2], int(match[1]), "")
                    parent = volnames.build(TYPE, base)
                    vol = replace(vol, base=match[2], base_vmid=int(match[1]))
        elif vol.format == DiskFormat.SUBVOL.value:
            size = 0
        notes = path.with_name(path.name + NOTES)
        return Volume(
            name=volnames.build(TYPE, vol),
            content=vol.content,
            format=vol.format,
            size=size,
            vmid=vol.vmid,
            parent=parent,
            used=info.st_blocks * 512,
            protected=path.with_name(path.name + PROTECTED).exists(),
            notes=notes.read_text() if notes.exists() else "",
            ctime=int(info.st_ctime),
        )

    def _scan_disks(self, vmid: int | None) -> list[Volume]:
        found: list[Volume] = []
        for folder in sorted((self.path / "images").iterdir()):
            if not folder.name.isdigit() or (vmid is not None and int(folder.name) != vmid):
                continue
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(".") or entry.name.endswith((NOTES, PROTECTED)):
                    continue
                try:
                    vol = volnames.parse(TYPE, f"{folder.name}/{entry.name}")
                except RucherError:
                    continue  # not a volume Rucher or Proxmox named
                found.append(self._describe(vol, entry))
        return found

    def _scan(self, content: ContentType | None, vmid: int | None) -> list[Volume]:
        self._activate()
        found: list[Volume] = []
        if content in (None, ContentType.IMAGES, ContentType.ROOTDIR):
            found += self._scan_disks(vmid)
        for kind, folder_name in FILE_FOLDERS.items():
            if content not in (None, kind):
                continue
            for entry in sorted((self.path / folder_name).iterdir()):
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                try:
                    vol = volnames.file_volume(kind, entry.name)
                except RucherError:
                    continue
                if vmid is None or vol.vmid == vmid:
                    found.append(self._describe(vol, entry))
        return found

    async def status(self) -> Capacity:
        """The file system's space."""

        def measure() -> Capacity:
            self._activate()
            fs = os.statvfs(self.path)
            total = fs.f_blocks * fs.f_frsize
            return Capacity(
                total=total,
                used=total - fs.f_bfree * fs.f_frsize,
                avail=fs.f_bavail * fs.f_frsize,
            )

        try:
            return await asyncio.to_thread(measure)
        except OSError:
            return Capacity(total=0, used=0, avail=0, active=False)

    async def list_volumes(
        self, content: ContentType | None = None, vmid: int | None = None
    ) -> list[Volume]:
        """Every volume under the folder, optionally of one content type or owner."""
        return await asyncio.to_thread(self._scan, content, vmid)

    async def volume(self, name: str, *, detail: bool = False) -> Volume:
        """One volume with its path (a file's usage is always at hand: ``detail`` adds nothing)."""

        def read() -> Volume:
            vol, path = self._existing(name)
            return replace(self._describe(vol, path), path=str(path))

        return await asyncio.to_thread(read)

    async def snapshots(self, name: str) -> list[str]:
        """The qcow2 internal snapshots of a disk."""

        def read() -> list[str]:
            vol, path = self._existing(name)
            if vol.format != DiskFormat.QCOW2.value:
                return []
            header = read_qcow2_header(path)
            return list(header.snapshots) if header else []

        return await asyncio.to_thread(read)

    async def children(self, name: str) -> list[str]:
        """Overlays in any ``images/<vmid>/`` whose backing file is this base."""
        vol = volnames.parse(TYPE, name)
        if not vol.is_base:
            return []
        wanted = f"../{vol.vmid}/{vol.name}"

        def scan() -> list[str]:
            found = []
            for path in sorted((self.path / "images").glob("*/*.qcow2")):
                header = read_qcow2_header(path)
                if header is not None and header.backing_file == wanted:
                    found.append(f"{self.definition.storage}:{vol.vmid}/{vol.name}/"
                                 f"{path.parent.name}/{path.name}")  # fmt: skip
            return found

        return await asyncio.to_thread(scan)

    # Creating ----------------------------------------------------------------------------

    def _claim(self, path: Path, *, folder: bool = False) -> None:
        """Take a name for good before filling it: a concurrent writer gets ``exists``."""
        try:
            if folder:
                path.mkdir()
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        except FileExistsError as err:
            raise RucherError(
                ErrorCode.EXISTS,
                f"volume '{self.definition.storage}:{path.parent.name}/{path.name}' already exists",
                details={"field": "filename"},
            ) from err

    async def _new_file(
        self,
        revert: Revert,
        vmid: int,
        name: str | None,
        fmt: str,
        *,
        check: Callable[[], object] | None = None,
        fill: Callable[[Path], object] | None = None,
    ) -> Path:
        """Claim ``images/<vmid>/<name>`` (the next free disk name when None), with undo steps.

        ``check`` runs first and ``fill`` (given the claimed path) last, in the same worker
        thread as the claim: the clone path makes one thread hop for the whole step. Whatever
        the thread made gets its undo step, even when a later part of the thread's work fails.
        """
        folder = self.path / "images" / str(vmid)
        made: list[Path] = []

        def claim() -> Path:
            if check is not None:
                check()
            self._activate()
            if not folder.exists():
                folder.mkdir(exist_ok=True)
                made.append(folder)
            path = self._claim_next(folder, vmid, name, fmt)
            made.append(path)
            if fill is not None:
                fill(path)
            return path

        try:
            return await _thread_step(claim)
        finally:
            for item in made:
                undo = _rmdir_if_empty if item == folder else _remove
                revert.add(f"remove {item}", functools.partial(asyncio.to_thread, undo, item))

    def _claim_next(self, folder: Path, vmid: int, name: str | None, fmt: str) -> Path:
        """Claim ``folder/name``, or the next free disk name of ``vmid`` when None."""
        if name is not None:
            self._claim(folder / name, folder=fmt == DiskFormat.SUBVOL.value)
            return folder / name
        taken = {entry.name.split(".")[0] for entry in folder.iterdir()}
        for index in range(10_000):
            candidate = volnames.disk_name(TYPE, vmid, index, fmt)
            twin = volnames.disk_name(TYPE, vmid, index, fmt, base=True)
            if {candidate.split(".")[0], twin.split(".")[0]} & taken:
                continue
            with contextlib.suppress(RucherError):
                self._claim(folder / candidate, folder=fmt == DiskFormat.SUBVOL.value)
                return folder / candidate
        raise RucherError(ErrorCode.INTERNAL, f"no free disk name for VM {vmid}")

    async def _described(self, path: Path) -> Volume:
        vol = volnames.parse(TYPE, f"{path.parent.name}/{path.name}")
        return await asyncio.to_thread(self._describe, vol, path)

    async def allocate(self, disk: NewDisk) -> Volume:
        """A new disk file (or a subvolume folder); nothing is left behind if a step fails."""
        async with Revert() as revert:
            path = await self._new_file(revert, disk.vmid, disk.name, disk.format)
            if disk.format != DiskFormat.SUBVOL.value:
                await self.qemu_img.create(path, disk.format, disk.size)
            return await self._described(path)

    async def clone_linked(
        self, name: str, snapshot: str | None, vmid: int, target: str | None
    ) -> Volume:
        """A qcow2 overlay backed by the base (``../<basevmid>/<base>``)."""
        vol = volnames.parse(TYPE, name)
        if not vol.is_base:
            raise invalid(f"clone_image only works on base images, not '{name}'")
        if snapshot is not None:
            raise RucherError(
                ErrorCode.UNSUPPORTED,
                "linked clones of a snapshot are not possible on dir storage",
                details={"field": "snapname"},
            )
        base_size = 0

        def check() -> None:
            nonlocal base_size
            _, base_path = self._existing(name)
            header = read_qcow2_header(base_path) if vol.format == "qcow2" else None
            base_size = header.size if header else base_path.stat().st_size

        def overlay(path: Path) -> None:
            self.qemu_img.create_blocking(
                path, "qcow2", backing=f"../{vol.vmid}/{vol.name}", backing_format=vol.format
            )

        async with Revert() as revert:
            # Check, claim and qemu-img in one worker thread: the clone is one hop plus qemu-img.
            fmt = DiskFormat.QCOW2.value
            path = await self._new_file(revert, vmid, target, fmt, check=check, fill=overlay)
        # Known without reading the new file again: an overlay has its base's size.
        clone = VolName(ContentType.IMAGES, path.name, vmid, "qcow2", vol.name, vol.vmid)
        return Volume(
            name=volnames.build(TYPE, clone),
            content=ContentType.IMAGES,
            format="qcow2",
            size=base_size,
            vmid=vmid,
            parent=volnames.build(TYPE, replace(vol, base=None, base_vmid=None)),
        )

    async def copy(self, name: str, snapshot: str | None, disk: NewDisk) -> Volume:
        """A full copy with ``qemu-img convert`` (of a snapshot: qcow2 sources only)."""
        vol, source = await asyncio.to_thread(self._existing, name)
        self._check_copyable(vol, snapshot)
        async with Revert() as revert:
            path = await self._new_file(revert, disk.vmid, disk.name, disk.format)
            await self.qemu_img.convert(source, vol.format, path, disk.format, snapshot)
            return await self._described(path)

    def _check_copyable(self, vol: VolName, snapshot: str | None) -> None:
        if vol.format == DiskFormat.SUBVOL.value:
            raise RucherError(ErrorCode.UNSUPPORTED, "copying a subvolume is not supported")
        if snapshot is not None and vol.format != DiskFormat.QCOW2.value:
            raise invalid(f"volume format '{vol.format}' has no snapshots", "snapname")

    async def export_raw(self, name: str, snapshot: str | None, target: Path) -> None:
        """The disk's content as a sparse raw file."""
        vol, source = await asyncio.to_thread(self._existing, name)
        self._check_copyable(vol, snapshot)
        await self.qemu_img.convert(source, vol.format, target, "raw", snapshot)

    async def import_raw(self, source: Path, disk: NewDisk) -> Volume:
        """A new disk converted from a raw file."""
        async with Revert() as revert:
            path = await self._new_file(revert, disk.vmid, disk.name, disk.format)
            await self.qemu_img.convert(source, "raw", path, disk.format)
            return await self._described(path)

    # Changing ----------------------------------------------------------------------------

    async def free(self, name: str) -> None:
        """Delete the file (with its snapshots and sidecars); refused with linked clones."""
        vol, path = await asyncio.to_thread(self._existing, name)
        clones = await self.children(name)
        if clones:
            raise _in_use(self._volid(vol), clones)
        await asyncio.to_thread(_remove, path)
        if vol.content in (ContentType.IMAGES, ContentType.ROOTDIR):
            await asyncio.to_thread(_rmdir_if_empty, path.parent)

    async def resize(self, name: str, size: int) -> Volume:
        """Grow a raw, qcow2 or vmdk file with ``qemu-img resize``."""
        vol, path = await asyncio.to_thread(self._existing, name)
        if vol.is_base:
            raise invalid(f"cannot resize base volume '{self._volid(vol)}'")
        if vol.format != DiskFormat.SUBVOL.value:
            await self.qemu_img.resize(path, vol.format, size)
        return await asyncio.to_thread(self._describe, vol, path)

    async def _qcow2(self, name: str) -> tuple[VolName, Path, list[str]]:
        def read() -> tuple[VolName, Path, list[str]]:
            vol, path = self._existing(name)
            if vol.format != DiskFormat.QCOW2.value:
                raise RucherError(
                    ErrorCode.UNSUPPORTED,
                    f"snapshots are not possible on {vol.format} volume '{self._volid(vol)}'",
                    details={"field": "volid"},
                )
            header = read_qcow2_header(path)
            return vol, path, list(header.snapshots) if header else []

        return await asyncio.to_thread(read)

    async def snapshot_create(self, name: str, snapshot: str) -> None:
        """A qcow2 internal snapshot."""
        vol, path, existing = await self._qcow2(name)
        if snapshot in existing:
            raise RucherError(
                ErrorCode.EXISTS,
                f"snapshot '{snapshot}' of '{self._volid(vol)}' already exists",
                details={"field": "snapname"},
            )
        await self.qemu_img.snapshot(path, "-c", snapshot)

    async def _existing_snapshot(self, name: str, snapshot: str) -> Path:
        vol, path, existing = await self._qcow2(name)
        if snapshot not in existing:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"snapshot '{snapshot}' of '{self._volid(vol)}' does not exist",
                details={"field": "snapname"},
            )
        return path

    async def snapshot_rollback(self, name: str, snapshot: str) -> None:
        """Apply a qcow2 internal snapshot."""
        await self.qemu_img.snapshot(await self._existing_snapshot(name, snapshot), "-a", snapshot)

    async def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Delete a qcow2 internal snapshot (overlays hang on the file, never on a snapshot)."""
        await self.qemu_img.snapshot(await self._existing_snapshot(name, snapshot), "-d", snapshot)

    async def create_base(self, name: str) -> Volume:
        """Rename ``vm-`` to ``base-`` and make the file read-only."""
        vol, path = await asyncio.to_thread(self._existing, name)
        if vol.is_base:
            raise invalid(f"'{self._volid(vol)}' is already a base volume")
        if vol.format == DiskFormat.SUBVOL.value:
            raise RucherError(ErrorCode.UNSUPPORTED, "subvolumes cannot become templates here")
        target = path.with_name(vol.name.replace("vm-", "base-", 1))

        def rename() -> None:
            _move(path, target, self.definition.storage)
            target.chmod(0o444)

        await asyncio.to_thread(rename)
        return await self._described_at(target, vol)

    async def _described_at(self, path: Path, like: VolName) -> Volume:
        vol = replace(like, name=path.name, vmid=int(path.parent.name))
        return await asyncio.to_thread(self._describe, vol, path)

    async def rename(self, name: str, vmid: int, target: str | None) -> Volume:
        """Move a disk to ``images/<vmid>/`` under a new name (its backing path stays valid)."""
        vol, source = await asyncio.to_thread(self._existing, name)
        if vol.is_base:
            raise invalid(f"base volume '{self._volid(vol)}' cannot change owner")
        async with Revert() as revert:
            destination = await self._new_file(revert, vmid, target, vol.format)

            def move() -> None:
                if vol.format == DiskFormat.SUBVOL.value:
                    destination.rmdir()
                    source.rename(destination)
                else:
                    source.replace(destination)
                for suffix in (NOTES, PROTECTED):
                    sidecar = source.with_name(source.name + suffix)
                    if sidecar.exists():
                        sidecar.replace(destination.with_name(destination.name + suffix))
                _rmdir_if_empty(source.parent)

            await asyncio.to_thread(move)
        return await self._described_at(destination, vol)

    async def set_attributes(self, name: str, notes: str | None, protected: bool | None) -> Volume:
        """Write or remove the ``.notes`` and ``.protected`` sidecars."""

        def change() -> Volume:
            vol, path = self._existing(name)
            if notes is not None:
                sidecar = path.with_name(path.name + NOTES)
                if notes:
                    sidecar.write_text(notes)
                else:
                    sidecar.unlink(missing_ok=True)
            if protected is not None:
                marker = path.with_name(path.name + PROTECTED)
                if protected:
                    marker.touch()
                else:
                    marker.unlink(missing_ok=True)
            return self._describe(vol, path)

        return await asyncio.to_thread(change)

    async def map(self, name: str) -> VolumeMapping:
        """The file's path and its libvirt ``<disk>``."""
        vol, path = await asyncio.to_thread(self._existing, name)
        return file_mapping(self._volid(vol), str(path), vol.format, vol.content)

    async def file_target(self, content: ContentType, filename: str) -> Path:
        """Where an ISO or template named ``filename`` goes; ``exists`` when one is there."""
        vol = volnames.file_volume(content, filename, "filename")
        path = self._file(vol)

        def check() -> None:
            self._activate()
            if path.exists():
                raise RucherError(
                    ErrorCode.EXISTS,
                    f"refusing to override existing file '{self._volid(vol)}'",
                    details={"field": "filename"},
                )

        await asyncio.to_thread(check)
        return path

    def forget(self, name: str) -> None:
        """Nothing is cached: every call reads the files."""

    async def close(self) -> None:
        """Nothing to release."""


def _in_use(volid: str, clones: list[str]) -> RucherError:
    return RucherError(
        ErrorCode.INVALID,
        f"base volume '{volid}' is still in use by linked clones: {', '.join(clones)}",
        details={"field": "volid", "clones": clones},
    )


def _move(source: Path, target: Path, storage: str) -> None:
    """Rename without ever replacing an existing file."""
    try:
        os.link(source, target)
    except FileExistsError as err:
        raise RucherError(
            ErrorCode.EXISTS,
            f"volume '{storage}:{target.parent.name}/{target.name}' already exists",
            details={"field": "volid"},
        ) from err
    source.unlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    for suffix in (NOTES, PROTECTED):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


async def _thread_step(work: Callable[[], T]) -> T:
    """``work`` in a worker thread; if cancelled, wait for the thread before undoing anything.

    A thread cannot be stopped: undoing while it still creates files would leave them behind.
    """
    step = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await step
        raise


def _rmdir_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()
