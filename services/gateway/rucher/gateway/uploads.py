"""An upload written into the ``uploads`` object store as it arrives, never held whole.

The object is laid out as NATS's own object store writes one (128 KiB chunks on
``$O.uploads.C.{nuid}``, then a meta record with the size and SHA-256 digest), so the storage
service reads it with the ordinary object store API. Chunks are published one at a time and each
waits for its acknowledgement, which paces the HTTP body to what JetStream stores. Until the meta
record is written the object does not exist for a reader; :meth:`ObjectUpload.abort` purges the
chunks of an upload that will never be committed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DEFAULT_CHUNK_SIZE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from rucher.proto.streams import UPLOADS


class ObjectUpload:
    """One object being written: :meth:`write` the bytes, then :meth:`commit` or :meth:`abort`."""

    def __init__(self, js: JetStreamContext, name: str) -> None:
        self.js = js
        self.name = name
        self.nuid = uuid.uuid4().hex
        self.size = 0
        self.chunks = 0
        self._digest = hashlib.sha256()
        self._pending = bytearray()
        self._subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=UPLOADS.name, obj=self.nuid)

    async def write(self, data: AsyncIterator[bytes]) -> int:
        """Store ``data`` as the object's chunks; the number of bytes stored so far."""
        async for piece in data:
            self._pending += piece
            while len(self._pending) >= OBJ_DEFAULT_CHUNK_SIZE:
                await self._publish(bytes(self._pending[:OBJ_DEFAULT_CHUNK_SIZE]))
                del self._pending[:OBJ_DEFAULT_CHUNK_SIZE]
        return self.size + len(self._pending)

    async def _publish(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        await self.js.publish(self._subject, chunk)
        self.size += len(chunk)
        self.chunks += 1

    async def commit(self) -> int:
        """Write the last chunk and the meta record: the object now exists; its size."""
        if self._pending:
            await self._publish(bytes(self._pending))
            self._pending.clear()
        info = api.ObjectInfo(
            name=self.name,
            bucket=UPLOADS.name,
            nuid=self.nuid,
            size=self.size,
            chunks=self.chunks,
            mtime=datetime.now(UTC).isoformat(),
            digest=OBJ_DIGEST_TEMPLATE.format(
                digest=base64.urlsafe_b64encode(self._digest.digest()).decode()
            ),
            options=api.ObjectMetaOptions(max_chunk_size=OBJ_DEFAULT_CHUNK_SIZE),
        )
        meta = OBJ_META_PRE_TEMPLATE.format(
            bucket=UPLOADS.name, obj=base64.urlsafe_b64encode(self.name.encode()).decode()
        )
        await self.js.publish(
            meta,
            json.dumps(info.as_dict()).encode(),
            headers={api.Header.ROLLUP: "sub"},
        )
        return self.size

    async def abort(self) -> None:
        """Purge the chunks written so far (an upload that failed leaves nothing behind)."""
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.js.purge_stream(
                OBJ_STREAM_TEMPLATE.format(bucket=UPLOADS.name), subject=self._subject
            )


async def delete_object(js: JetStreamContext, name: str) -> None:
    """Remove a committed object that will not be used (the storage service refused it)."""
    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
        store = await js.object_store(UPLOADS.name)
        await store.delete(name)
