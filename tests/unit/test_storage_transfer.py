"""Uploads and downloads into a dir storage: a file becomes visible only complete and verified."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import (
    ChecksumAlgorithm,
    ContentDownload,
    ContentType,
    ContentUpload,
    StorageDefinition,
    StorageRecord,
    StorageType,
)
from rucher.storage.copies import Copier
from rucher.storage.drivers import NodeContext
from rucher.storage.pool import DriverPool
from rucher.storage.ports import TaskBody, UploadInfo
from rucher.storage.transfer import Transfers
from rucher.storage.volnames import invalid

from .test_storage_service import Events, MemoryBook

DATA = b"ISO9660" * 100_000
USER = "root@pam"


@dataclass
class Task:
    upid: str
    lines: list[str] = field(default_factory=list)
    error: BaseException | None = None

    async def log(self, text: str) -> None:
        self.lines.append(text)


@dataclass
class Tasks:
    """Runs each task body at once and keeps how it ended."""

    ran: list[Task] = field(default_factory=list)

    async def submit(
        self, *, task_type: str, task_id: str, user: str, body: TaskBody, command_id: str | None
    ) -> str:
        task = Task(upid=f"UPID:n1:{task_type}:{task_id}")
        self.ran.append(task)
        try:
            await body(task)
        except RucherError as err:
            task.error = err
        return task.upid


@dataclass
class Uploads:
    """Objects as chunk lists; ``stored`` may hold fewer chunks than the object announces."""

    objects: dict[str, tuple[bytes, list[bytes]]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def add(self, name: str, data: bytes, *, keep: int | None = None, digest: bytes | None = None):
        chunks = [data[i : i + 131072] for i in range(0, len(data), 131072)]
        self.objects[name] = (digest or hashlib.sha256(data).digest(), chunks[:keep])
        self.sizes = {**getattr(self, "sizes", {}), name: len(data)}

    async def info(self, name: str) -> UploadInfo:
        if name not in self.objects:
            raise RucherError(ErrorCode.NOT_FOUND, "no upload", details={"field": "object"})
        return UploadInfo(name=name, size=self.sizes[name], sha256=self.objects[name][0])

    async def chunks(self, info: UploadInfo) -> AsyncIterator[bytes]:
        received = 0
        for chunk in self.objects[info.name][1]:
            received += len(chunk)
            yield chunk
        if received != info.size:
            raise invalid(f"upload '{info.name}' is incomplete", "object")

    async def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.objects.pop(name, None)


class Fetcher:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def fetch(self, url: str, *, verify: bool) -> AsyncIterator[bytes]:
        yield self.body[:1000]
        yield self.body[1000:]


@dataclass
class Setup:
    transfers: Transfers
    tasks: Tasks
    uploads: Uploads
    events: Events
    root: Path

    def visible(self) -> list[str]:
        return sorted(p.name for p in (self.root / "template" / "iso").iterdir())


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    book = MemoryBook(
        [
            StorageRecord(definition=StorageDefinition(
                storage="local", storage_type=StorageType.DIR, content=tuple(ContentType))),
            StorageRecord(definition=StorageDefinition(
                storage="disks", storage_type=StorageType.DIR, content=(ContentType.IMAGES,),
                path=str(tmp_path / "disks"))),
        ]
    )  # fmt: skip
    pool = DriverPool(node="n1", book=book, context=NodeContext(local_path=tmp_path / "local"))
    tasks, uploads, events = Tasks(), Uploads(), Events()
    transfers = Transfers(
        node="n1", pool=pool, tasks=tasks, uploads=uploads, fetcher=Fetcher(DATA),
        events=events, copier=Copier(pool, tmp_path / "staging"),
    )  # fmt: skip
    return Setup(transfers, tasks, uploads, events, tmp_path / "local")


def upload(name: str = "obj", filename: str = "debian.iso", **fields: Any) -> ContentUpload:
    fields.setdefault("content", ContentType.ISO)
    return ContentUpload(
        command_id="c", user=USER, storage=fields.pop("storage", "local"), object=name,
        filename=filename, **fields,
    )  # fmt: skip


async def test_an_upload_is_stored_whole_under_its_name_and_the_object_is_deleted(setup):
    setup.uploads.add("obj", DATA)

    accepted = await setup.transfers.upload(upload())

    task = setup.tasks.ran[0]
    assert task.error is None and accepted.upid == task.upid
    assert (setup.root / "template/iso/debian.iso").read_bytes() == DATA
    assert setup.visible() == ["debian.iso"]
    assert setup.uploads.deleted == ["obj"]
    assert setup.events.sent[0][1].volid == "local:iso/debian.iso"
    assert any("finished file import" in line for line in task.lines)


async def test_a_cut_off_upload_leaves_no_file_and_no_partial_file(setup):
    setup.uploads.add("obj", DATA, keep=2)

    await setup.transfers.upload(upload())

    error = setup.tasks.ran[0].error
    assert isinstance(error, RucherError) and "incomplete" in error.message
    assert setup.visible() == []
    assert setup.events.sent == []


async def test_an_upload_whose_digest_does_not_match_leaves_nothing(setup):
    setup.uploads.add("obj", DATA, digest=hashlib.sha256(b"other").digest())

    await setup.transfers.upload(upload())

    assert "SHA-256" in str(setup.tasks.ran[0].error)
    assert setup.visible() == []


async def test_the_uploader_s_own_checksum_is_verified(setup):
    md5 = hashlib.md5(DATA, usedforsecurity=False).hexdigest()
    setup.uploads.add("good", DATA)
    setup.uploads.add("bad", DATA)

    await setup.transfers.upload(upload("good", "good.iso", checksum=md5.upper(),
                                        checksum_algorithm=ChecksumAlgorithm.MD5))  # fmt: skip
    await setup.transfers.upload(upload("bad", "bad.iso", checksum="0" * 32,
                                        checksum_algorithm=ChecksumAlgorithm.MD5))  # fmt: skip

    assert setup.tasks.ran[0].error is None
    assert isinstance(setup.tasks.ran[1].error, RucherError)
    assert setup.tasks.ran[1].error.details["field"] == "checksum"
    assert setup.visible() == ["good.iso"]


@pytest.mark.parametrize(
    ("command", "code", "field"),
    [
        (upload(checksum="abc"), ErrorCode.INVALID, "checksum-algorithm"),
        (upload(checksum="xyz", checksum_algorithm=ChecksumAlgorithm.SHA256), ErrorCode.INVALID,
         "checksum"),
        (upload(content=ContentType.IMAGES), ErrorCode.INVALID, "content"),
        (upload(storage="disks"), ErrorCode.INVALID, "content"),
        (upload(filename="debian.exe"), ErrorCode.INVALID, "filename"),
        (upload(storage="nowhere"), ErrorCode.NOT_FOUND, "storage"),
        (upload(name="missing"), ErrorCode.NOT_FOUND, "object"),
    ],
)  # fmt: skip
async def test_bad_uploads_are_refused_before_a_task_starts(setup, command, code, field):
    setup.uploads.add("obj", DATA)

    with pytest.raises(RucherError) as caught:
        await setup.transfers.upload(command)

    assert (caught.value.code, caught.value.details.get("field")) == (code, field)
    assert setup.tasks.ran == []


async def test_an_existing_file_is_never_replaced(setup):
    setup.uploads.add("obj", DATA)
    await setup.transfers.upload(upload())
    setup.uploads.add("obj", b"new")

    with pytest.raises(RucherError) as caught:
        await setup.transfers.upload(upload())

    assert caught.value.code is ErrorCode.EXISTS and caught.value.details["field"] == "filename"
    assert (setup.root / "template/iso/debian.iso").read_bytes() == DATA


async def test_a_download_is_stored_and_checked_like_an_upload(setup):
    sha = hashlib.sha256(DATA).hexdigest()
    command = ContentDownload(
        command_id="d", user=USER, storage="local", url="http://127.0.0.1:1/x.iso",
        filename="x.iso", content=ContentType.ISO, checksum=sha,
        checksum_algorithm=ChecksumAlgorithm.SHA256,
    )  # fmt: skip

    await setup.transfers.download(command)

    assert setup.tasks.ran[0].error is None
    assert (setup.root / "template/iso/x.iso").read_bytes() == DATA
    with pytest.raises(RucherError) as caught:
        await setup.transfers.download(
            ContentDownload(
                command_id="e",
                user=USER,
                storage="local",
                url="file:///etc/passwd",
                filename="y.iso",
                content=ContentType.ISO,
            )
        )
    assert caught.value.details["field"] == "url"
