"""Tasks that move bytes: uploads from the ``uploads`` object store, downloads, full copies.

A file arrives under a hidden temporary name beside its target and becomes visible only once
complete and verified (size, the object's SHA-256, the uploader's own checksum): an upload that
is cut off or fails its checksum leaves nothing in the storage's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import structlog

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import (
    VOLUME_ALLOCATED,
    ChecksumAlgorithm,
    ContentDownload,
    ContentType,
    ContentUpload,
    VolumeAllocated,
    VolumeCopy,
)
from rucher.proto.task import TaskAccepted
from rucher.storage.checks import check_content
from rucher.storage.copies import Copier
from rucher.storage.pool import DriverPool
from rucher.storage.ports import EventSink, Fetcher, TaskLog, TaskSubmitter, UploadSource
from rucher.storage.volnames import invalid

log = structlog.get_logger("rucher.storage.transfer")

FILE_CONTENT = (ContentType.ISO, ContentType.VZTMPL)
FLUSH_BYTES = 1 << 20
_DIGEST_SIZES = {
    algorithm: hashlib.new(algorithm.value).digest_size * 2 for algorithm in ChecksumAlgorithm
}


def _checker(
    checksum: str | None, algorithm: ChecksumAlgorithm | None
) -> tuple[ChecksumAlgorithm, str] | None:
    """Check an uploader's checksum parameters; None when none was given."""
    if checksum is None and algorithm is None:
        return None
    if checksum is None or algorithm is None:
        field = "checksum" if checksum is None else "checksum-algorithm"
        raise invalid("'checksum' and 'checksum-algorithm' go together", field)
    wanted = checksum.strip().lower()
    if len(wanted) != _DIGEST_SIZES[algorithm] or any(c not in "0123456789abcdef" for c in wanted):
        raise invalid(f"'{checksum}' is not a {algorithm} checksum", "checksum")
    return algorithm, wanted


class _Staged:
    """A file written under a hidden name beside ``target``, published only by :meth:`publish`."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        self.size = 0
        self.hashes: dict[str, hashlib._Hash] = {}
        self._file: IO[bytes] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0

    def hash(self, name: str) -> None:
        """Also compute ``name`` (sha256, md5...) over the bytes written."""
        self.hashes.setdefault(name, hashlib.new(name))

    async def open(self) -> None:
        """Create the temporary file (it never replaces anything)."""
        self._file = await asyncio.to_thread(self.partial.open, "xb")

    async def write(self, data: bytes) -> None:
        """Hash and write bytes, a megabyte at a time."""
        for digest in self.hashes.values():
            digest.update(data)
        self.size += len(data)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._buffer and self._file is not None:
            await asyncio.to_thread(self._file.write, b"".join(self._buffer))
        self._buffer.clear()
        self._buffered = 0

    async def publish(self) -> None:
        """Make the file visible under its name, atomically, refusing to replace one."""
        await self._flush()
        file = self._file
        if file is None:
            raise RuntimeError("publish before open")

        def finish() -> None:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            try:
                os.link(self.partial, self.target)
            except FileExistsError as err:
                raise RucherError(
                    ErrorCode.EXISTS,
                    f"refusing to override existing file '{self.target.name}'",
                    details={"field": "filename"},
                ) from err
            finally:
                self.partial.unlink(missing_ok=True)

        await asyncio.to_thread(finish)

    async def discard(self) -> None:
        """Remove the temporary file."""

        def remove() -> None:
            if self._file is not None:
                self._file.close()
            self.partial.unlink(missing_ok=True)

        await asyncio.to_thread(remove)


async def _verify(
    task: TaskLog,
    staged: _Staged,
    checks: tuple[ChecksumAlgorithm, str] | None,
    expected: tuple[int, bytes] | None,
) -> None:
    """Refuse a file whose size or digests are not what the sender announced."""
    if expected is not None:
        size, sha256 = expected
        if staged.size != size:
            raise invalid(f"upload incomplete: {staged.size} of {size} bytes", "object")
        if staged.hashes["sha256"].digest() != sha256:
            raise invalid("upload corrupted: its SHA-256 digest does not match", "object")
    if checks is not None:
        algorithm, wanted = checks
        got = staged.hashes[algorithm.value].hexdigest()
        if got != wanted:
            raise invalid(f"checksum mismatch: got '{got}' != expect '{wanted}'", "checksum")
        await task.log(f"{algorithm} checksum verified")


class Transfers:
    """``content_upload``, ``content_download`` and ``volume_copy``: each runs as a task."""

    def __init__(
        self,
        *,
        node: str,
        pool: DriverPool,
        tasks: TaskSubmitter,
        uploads: UploadSource,
        fetcher: Fetcher,
        events: EventSink,
        copier: Copier,
    ) -> None:
        self.node = node
        self.pool = pool
        self.tasks = tasks
        self.uploads = uploads
        self.fetcher = fetcher
        self.events = events
        self.copier = copier

    async def _target(self, storage: str, content: ContentType, filename: str) -> Path:
        driver, definition = await self.pool.driver(storage)
        if content not in FILE_CONTENT:
            raise invalid(f"content type '{content}' cannot be uploaded here", "content")
        check_content(definition, content)
        return await driver.file_target(content, filename)

    async def _receive(
        self,
        task: TaskLog,
        target: Path,
        chunks: AsyncIterator[bytes],
        checks: tuple[ChecksumAlgorithm, str] | None,
        expected: tuple[int, bytes] | None = None,
    ) -> int:
        """Write ``chunks`` to ``target`` through a temporary file; verify; publish."""
        staged = _Staged(target)
        staged.hash("sha256")
        if checks is not None:
            staged.hash(checks[0].value)
        await staged.open()
        try:
            async for chunk in chunks:
                await staged.write(chunk)
            await task.log(f"received {staged.size} bytes")
            await _verify(task, staged, checks, expected)
            await staged.publish()
        except BaseException:
            await staged.discard()
            raise
        return staged.size

    def _allocated(self, storage: str, content: ContentType, name: str, size: int) -> None:
        prefix = "iso" if content is ContentType.ISO else "vztmpl"
        event = VolumeAllocated(
            event_id=new_id(),
            node=self.node,
            time=time.time(),
            volid=f"{storage}:{prefix}/{name}",
            size=size,
        )
        self.events.emit(VOLUME_ALLOCATED.to(node=self.node), event)

    async def upload(self, command: ContentUpload) -> TaskAccepted:
        """Store an ``uploads`` object as an ISO or template (``POST .../upload``)."""
        target = await self._target(command.storage, command.content, command.filename)
        checks = _checker(command.checksum, command.checksum_algorithm)
        info = await self.uploads.info(command.object)

        async def body(task: TaskLog) -> None:
            bound = log.bind(task=task.upid, object=command.object)
            await task.log(f"starting file import from: {command.object} ({info.size} bytes)")
            await task.log(f"target file: {target}")
            try:
                size = await self._receive(
                    task,
                    target,
                    self.uploads.chunks(info),
                    checks,
                    expected=(info.size, info.sha256),
                )
            finally:
                with contextlib.suppress(RucherError):
                    await self.uploads.delete(command.object)
            await task.log("finished file import successfully")
            bound.info("upload_stored", target=str(target), size=size)
            self._allocated(command.storage, command.content, command.filename, size)

        upid = await self.tasks.submit(
            task_type="imgcopy",
            task_id=command.filename,
            user=command.user,
            body=body,
            command_id=command.command_id,
        )
        return TaskAccepted(upid=upid)

    async def download(self, command: ContentDownload) -> TaskAccepted:
        """Fetch an ISO or template from a URL this node reaches (``POST .../download-url``)."""
        if not command.url.startswith(("http://", "https://")):
            raise invalid(f"'{command.url}' is not an http or https URL", "url")
        target = await self._target(command.storage, command.content, command.filename)
        checks = _checker(command.checksum, command.checksum_algorithm)

        async def body(task: TaskLog) -> None:
            await task.log(f"downloading {command.url} to {target}")
            chunks = self.fetcher.fetch(command.url, verify=command.verify_certificates)
            size = await self._receive(task, target, chunks, checks)
            await task.log(f"download of '{command.url}' to '{target}' finished")
            log.info("download_stored", task=task.upid, target=str(target), size=size)
            self._allocated(command.storage, command.content, command.filename, size)

        upid = await self.tasks.submit(
            task_type="download",
            task_id=command.filename,
            user=command.user,
            body=body,
            command_id=command.command_id,
        )
        return TaskAccepted(upid=upid)

    async def copy(self, command: VolumeCopy) -> TaskAccepted:
        """A full copy of a volume for ``vmid`` as a task (``POST .../content/{volume}``)."""
        await self.pool.volume(command.volid)  # refuse a bad volume before starting anything

        async def body(task: TaskLog) -> None:
            await task.log(f"copy '{command.volid}' for VM {command.vmid}")
            volume, storage = await self.copier.full_copy(
                command.volid,
                vmid=command.vmid,
                storage=command.storage,
                fmt=command.format.value if command.format else None,
                filename=command.filename,
                snapname=command.snapname,
            )
            volid = f"{storage}:{volume.name}"
            await task.log(f"created '{volid}' ({volume.size} bytes)")
            event = VolumeAllocated(
                event_id=new_id(),
                node=self.node,
                time=time.time(),
                volid=volid,
                size=volume.size,
                vmid=volume.vmid,
                source=command.volid,
            )
            self.events.emit(VOLUME_ALLOCATED.to(node=self.node), event)

        upid = await self.tasks.submit(
            task_type="imgcopy",
            task_id=str(command.vmid),
            user=command.user,
            body=body,
            command_id=command.command_id,
        )
        return TaskAccepted(upid=upid)
