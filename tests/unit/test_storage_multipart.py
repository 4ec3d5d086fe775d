"""The gateway's streaming multipart reader: fields, then a file in pieces, cut-offs refused."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from rucher.gateway.multipart import CutOffError, MultipartError, read_form

BOUNDARY = "----rucher-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(fields: list[tuple[str, str]], file: bytes | None, name: str = "debian.iso") -> bytes:
    """A multipart body as requests/proxmoxer send one: fields, then the file."""
    body = b""
    for key, value in fields:
        body += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
        body += value.encode() + b"\r\n"
    if file is not None:
        body += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="filename"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        body += file + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    """``body`` in reads of ``size`` bytes, as a server hands a request body on."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def read_all(body: bytes, size: int) -> tuple[list[tuple[str, str]], str, bytes]:
    fields, upload = await read_form(pieces(body, size), CONTENT_TYPE, "filename")
    assert upload is not None
    data = b"".join([chunk async for chunk in upload.chunks()])
    assert await upload.reader.finish() == []
    return fields, upload.filename, data


@pytest.mark.parametrize("size", [1, 7, 69, 4096, 1 << 20])
async def test_fields_and_a_file_come_through_whatever_the_read_size(size):
    # Bytes that look like parts of a boundary must not end the file early.
    data = os.urandom(50_000) + b"\r\n--" + BOUNDARY[:-1].encode() + b"\r\n" + os.urandom(999)
    body = form([("content", "iso"), ("checksum-algorithm", "sha256")], data)
    fields, filename, received = await read_all(body, size)
    assert fields == [("content", "iso"), ("checksum-algorithm", "sha256")]
    assert filename == "debian.iso"
    assert received == data


async def test_the_file_arrives_in_pieces_never_whole():
    data = os.urandom(3 << 20)
    _, upload = await read_form(pieces(form([], data), 65536), CONTENT_TYPE, "filename")
    sizes = [len(chunk) async for chunk in upload.chunks()]
    assert sum(sizes) == len(data)
    assert max(sizes) <= 2 * 65536


async def test_an_empty_file_is_a_file():
    _, filename, data = await read_all(form([], b"", name="empty.iso"), 10)
    assert (filename, data) == ("empty.iso", b"")


async def test_a_form_without_a_file_has_no_upload():
    fields, upload = await read_form(
        pieces(form([("content", "iso")], None), 5), CONTENT_TYPE, "filename"
    )
    assert fields == [("content", "iso")] and upload is None


async def test_a_body_cut_off_inside_the_file_is_a_cut_off():
    body = form([("content", "iso")], os.urandom(10_000))
    _, upload = await read_form(pieces(body[:6_000], 1000), CONTENT_TYPE, "filename")
    with pytest.raises(CutOffError):
        async for _ in upload.chunks():
            pass


async def test_a_body_cut_off_after_the_file_but_before_its_end_is_a_cut_off():
    body = form([], b"x" * 100)
    _, upload = await read_form(pieces(body[:-4], 1000), CONTENT_TYPE, "filename")
    assert b"".join([c async for c in upload.chunks()]) == b"x" * 100
    with pytest.raises(CutOffError):
        await upload.reader.finish()


async def test_fields_after_the_file_are_reported():
    body = form([], b"data")[: -len(f"--{BOUNDARY}--\r\n")]
    body += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="checksum"\r\n\r\nab\r\n'.encode()
    )
    body += f"--{BOUNDARY}--\r\n".encode()
    _, upload = await read_form(pieces(body, 3), CONTENT_TYPE, "filename")
    assert b"".join([c async for c in upload.chunks()]) == b"data"
    assert await upload.reader.finish() == ["checksum"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", form([], b"x")),  # no boundary
        (CONTENT_TYPE, f"--{BOUNDARY}\r\nX-No-Disposition: 1\r\n\r\nv\r\n--{BOUNDARY}--".encode()),
        (CONTENT_TYPE, f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nv\r\n".encode()),
        (CONTENT_TYPE, form([("content", "x" * 70_000)], None)),  # a field beyond MAX_BODY
    ],
)
async def test_malformed_forms_are_refused(content_type, body):
    with pytest.raises(MultipartError):
        await read_form(pieces(body, 100), content_type, "filename")


async def test_a_file_in_another_part_is_refused():
    body = form([], b"data").replace(b'name="filename"', b'name="other"')
    with pytest.raises(MultipartError, match="'filename'"):
        await read_form(pieces(body, 100), CONTENT_TYPE, "filename")
