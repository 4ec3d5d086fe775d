"""``qemu-img`` as asyncio subprocesses, and a reader of qcow2 headers (size, backing, snapshots).

Reading the header directly answers a listing without one process per file; everything that
changes an image goes through ``qemu-img``.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import structlog

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode

log = structlog.get_logger("rucher.storage.qemu_img")

QCOW2_MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # up to snapshots_offset: 72 bytes
_SNAPSHOT = struct.Struct(">QIHHIIQII")  # a snapshot table entry's fixed part: 40 bytes
MAX_SNAPSHOTS = 65536


@dataclass(frozen=True)
class Qcow2Header:
    """What a qcow2 file says about itself."""

    size: int
    backing_file: str | None
    snapshots: tuple[str, ...]


def read_qcow2_header(path: Path) -> Qcow2Header | None:
    """Parse a qcow2 header; None when the file is not qcow2. Blocking: call it in a thread."""
    with path.open("rb") as image:
        head = image.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:4] != QCOW2_MAGIC:
            return None
        fields = _HEADER.unpack(head)
        backing_offset, backing_size, size = fields[2], fields[3], fields[5]
        nb_snapshots, snapshots_offset = fields[11], fields[12]
        backing = None
        if backing_offset:
            image.seek(backing_offset)
            backing = image.read(backing_size).decode(errors="replace")
        names: list[str] = []
        if 0 < nb_snapshots <= MAX_SNAPSHOTS:
            image.seek(snapshots_offset)
            for _ in range(nb_snapshots):
                entry = image.read(_SNAPSHOT.size)
                if len(entry) < _SNAPSHOT.size:
                    break
                _, _, id_size, name_size, *_, extra_size = _SNAPSHOT.unpack(entry)
                rest = image.read(extra_size + id_size + name_size)
                names.append(rest[extra_size + id_size :].decode(errors="replace"))
                used = _SNAPSHOT.size + extra_size + id_size + name_size
                image.seek((8 - used % 8) % 8, 1)  # entries are padded to 8 bytes
    return Qcow2Header(size=size, backing_file=backing, snapshots=tuple(names))


class QemuImgError(RucherError):
    """``qemu-img`` failed; the message is its own error line."""


class QemuImg:
    """Runs ``qemu-img`` without blocking the event loop; a cancelled call kills the process.

    The ``*_blocking`` variants run it in the calling thread, for a driver step that already
    runs in a worker thread (one thread hop for a whole step instead of one per action).
    """

    def __init__(self, binary: str = "qemu-img") -> None:
        self.binary = binary

    def _failed(self, args: tuple[str, ...], returncode: int, errors: bytes) -> QemuImgError:
        text = errors.decode(errors="replace").strip().splitlines()
        message = text[-1] if text else f"exit status {returncode}"
        message = message.removeprefix(f"{self.binary}: ")
        log.debug("qemu_img_failed", args=list(args), error=message)
        code = ErrorCode.NOT_FOUND if "not found" in message.lower() else ErrorCode.INTERNAL
        return QemuImgError(code, f"qemu-img {args[0]}: {message}")

    def _missing(self, err: FileNotFoundError) -> RucherError:
        return RucherError(ErrorCode.UNSUPPORTED, f"{self.binary} is not installed on this node")

    def run_blocking(self, *args: str) -> None:
        """:meth:`run` in the calling thread (blocking: only from a worker thread)."""
        try:
            done = subprocess.run(
                [self.binary, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
        except FileNotFoundError as err:
            raise self._missing(err) from err
        if done.returncode != 0:
            raise self._failed(args, done.returncode, done.stderr)

    async def run(self, *args: str) -> None:
        """Run ``qemu-img ARGS``; raise :class:`QemuImgError` with its error line on failure."""
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as err:
            raise self._missing(err) from err
        try:
            _, errors = await process.communicate()
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise self._failed(args, process.returncode or -1, errors)

    async def create(
        self,
        path: Path,
        fmt: str,
        size: int | None = None,
        *,
        backing: str | None = None,
        backing_format: str = "qcow2",
    ) -> None:
        """Create an image, or a qcow2 overlay on ``backing`` (a path relative to ``path``)."""
        await self.run(*_create_args(path, fmt, size, backing, backing_format))

    def create_blocking(
        self, path: Path, fmt: str, *, backing: str, backing_format: str = "qcow2"
    ) -> None:
        """:meth:`create` of an overlay, in the calling thread (only from a worker thread)."""
        self.run_blocking(*_create_args(path, fmt, None, backing, backing_format))

    async def convert(
        self, source: Path, source_fmt: str, target: Path, fmt: str, snapshot: str | None = None
    ) -> None:
        """Copy an image (or one of its snapshots) into a new file of format ``fmt``."""
        args = ["convert", "-q", "-f", source_fmt, "-O", fmt]
        if snapshot is not None:
            args += ["-l", f"snapshot.name={snapshot}"]
        if fmt == "raw":
            args += ["-S", "4k"]  # keep zero runs sparse
        await self.run(*args, str(source), str(target))

    async def resize(self, path: Path, fmt: str, size: int) -> None:
        """Grow an image to ``size`` bytes."""
        await self.run("resize", "-q", "-f", fmt, str(path), str(size))

    async def snapshot(self, path: Path, action: str, name: str) -> None:
        """``-c`` create, ``-a`` apply (roll back), ``-d`` delete an internal snapshot."""
        await self.run("snapshot", action, name, str(path))

    async def rebase_unsafe(self, path: Path, backing: str) -> None:
        """Point an overlay at its backing file's new name (the data does not change)."""
        await self.run("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(path))


def _create_args(
    path: Path, fmt: str, size: int | None, backing: str | None, backing_format: str
) -> list[str]:
    args = ["create", "-q", "-f", fmt]
    if fmt == "qcow2" and backing is None:
        args += ["-o", "preallocation=metadata"]  # Proxmox's default for qcow2
    if backing is not None:
        args += ["-b", backing, "-F", backing_format]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    return args
