"""A ``multipart/form-data`` body read as it arrives: small fields first, then one file, streamed.

Proxmox's upload endpoints take their parameters as form fields followed by the file (what
proxmoxer and the web interface send). The fields before the file are read whole (at most
``MAX_BODY`` bytes together); the file's bytes are handed on chunk by chunk and never held whole,
so an ISO of any size passes through the gateway in constant memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message

from rucher.gateway.config import MAX_BODY

# Headers of one part, ended by an empty line, are small; more is not a form.
MAX_PART_HEADERS = 16 * 1024


class MultipartError(ValueError):
    """A body that is not the multipart form it claims to be, or that ended early."""


class CutOffError(MultipartError):
    """The body ended (or the client went away) before the closing boundary."""


def boundary_of(content_type: str) -> bytes:
    """The boundary a ``multipart/form-data`` content type declares."""
    message = Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 70:
        raise MultipartError("multipart/form-data without a valid boundary")
    return boundary.encode("latin-1")


@dataclass
class Part:
    """One part's name, client file name (for a file) and content type."""

    name: str
    filename: str | None
    content_type: str | None


def _part(raw: bytes) -> Part:
    message = Message()
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep:
            raise MultipartError("a part header without ':'")
        message[key.strip()] = value.strip()
    if message.get_content_disposition() != "form-data":
        raise MultipartError("a part without 'Content-Disposition: form-data'")
    name = message.get_param("name", header="content-disposition")
    filename = message.get_param("filename", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise MultipartError("a part without a name")
    return Part(
        name=name,
        filename=filename if isinstance(filename, str) else None,
        content_type=message.get("content-type"),
    )


@dataclass
class MultipartReader:
    """Reads ``stream`` (the request body) part by part with a bounded buffer."""

    stream: AsyncIterator[bytes]
    boundary: bytes
    _buffer: bytearray = field(default_factory=lambda: bytearray(b"\r\n"))
    _ended: bool = False

    @property
    def _delimiter(self) -> bytes:
        return b"\r\n--" + self.boundary

    async def _more(self) -> None:
        """Append the next piece of the body; the body ending here is a cut-off."""
        if self._ended:
            raise CutOffError("the body ended before its closing boundary")
        try:
            chunk = await anext(self.stream)
        except StopAsyncIteration:
            self._ended = True
            raise CutOffError("the body ended before its closing boundary") from None
        self._buffer += chunk

    async def _until(self, marker: bytes, limit: int) -> bytes:
        """The bytes before ``marker`` (consumed with it), at most ``limit`` of them."""
        while (index := self._buffer.find(marker)) < 0:
            if len(self._buffer) > limit + len(marker):
                raise MultipartError("a form field is too large")
            await self._more()
        if index > limit:
            raise MultipartError("a form field is too large")
        value = bytes(self._buffer[:index])
        del self._buffer[: index + len(marker)]
        return value

    async def next_part(self) -> Part | None:
        """The next part's headers, or None after the closing boundary."""
        await self._until(self._delimiter, MAX_BODY)  # a preamble, or the previous part's end
        while len(self._buffer) < 2:
            await self._more()
        if self._buffer[:2] == b"--":
            return None
        if self._buffer[:2] != b"\r\n":
            raise MultipartError("a boundary not followed by a line break")
        del self._buffer[:2]
        return _part(await self._until(b"\r\n\r\n", MAX_PART_HEADERS))

    async def field(self, limit: int) -> bytes:
        """The current part's value, read whole (at most ``limit`` bytes)."""
        index = await self._peek_end(limit)
        value = bytes(self._buffer[:index])
        del self._buffer[:index]
        return value

    async def _peek_end(self, limit: int) -> int:
        while (index := self._buffer.find(self._delimiter)) < 0:
            if len(self._buffer) > limit + len(self._delimiter):
                raise MultipartError("a form field is too large")
            await self._more()
        if index > limit:
            raise MultipartError("a form field is too large")
        return index

    async def file(self) -> AsyncIterator[bytes]:
        """The current part's bytes as they arrive, up to (not including) its boundary."""
        keep = len(self._delimiter) - 1  # a delimiter may straddle two reads
        while True:
            index = self._buffer.find(self._delimiter)
            if index >= 0:
                if index:
                    yield bytes(self._buffer[:index])
                del self._buffer[:index]
                return
            if len(self._buffer) > keep:
                cut = len(self._buffer) - keep
                yield bytes(self._buffer[:cut])
                del self._buffer[:cut]
            await self._more()

    async def finish(self) -> list[str]:
        """Read to the closing boundary; the names of any parts that still came."""
        names: list[str] = []
        while (part := await self.next_part()) is not None:
            names.append(part.name)
            await self.field(MAX_BODY)
        return names


@dataclass
class FileUpload:
    """The file part of an upload request: its client name and its bytes, still to be read."""

    param: str
    filename: str
    reader: MultipartReader

    def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes; :class:`CutOffError` when the body ends before the file does."""
        return self.reader.file()


async def read_form(
    stream: AsyncIterator[bytes], content_type: str, file_param: str
) -> tuple[list[tuple[str, str]], FileUpload | None]:
    """The text fields before the file part, and the file part (None when there is none).

    The file must come in the part named ``file_param`` and carry a file name; it is the last
    part read here, so its bytes are still in ``stream``.
    """
    reader = MultipartReader(stream, boundary_of(content_type))
    fields: list[tuple[str, str]] = []
    size = 0
    while (part := await reader.next_part()) is not None:
        if part.filename is not None:
            if part.name != file_param:
                raise MultipartError(f"a file may only be sent as '{file_param}'")
            return fields, FileUpload(param=file_param, filename=part.filename, reader=reader)
        value = await reader.field(MAX_BODY - size)
        size += len(value)
        try:
            fields.append((part.name, value.decode("utf-8")))
        except UnicodeDecodeError as err:
            raise MultipartError(f"field '{part.name}' is not UTF-8") from err
    return fields, None
