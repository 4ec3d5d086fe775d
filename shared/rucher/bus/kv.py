"""Typed JetStream KV access: compare-and-set on revision, per-key TTL, and watches."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Generic, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from rucher.bus.client import FAILOVER_PATIENCE, read_stream, store
from rucher.bus.codec import decode, encode
from rucher.bus.errors import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.streams import BucketDef

if TYPE_CHECKING:
    from rucher.bus.client import Bus

T = TypeVar("T", bound=msgspec.Struct)

_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_TTL = "Nats-TTL"
_KV_OP = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
# JetStream's "wrong last sequence" error codes: the compare-and-set lost.
_WRONG_LAST_SEQUENCE = (10071, 10164)


class Operation(StrEnum):
    """What a KV entry records: a value, or the removal of one."""

    PUT = "PUT"
    DELETE = "DEL"
    PURGE = "PURGE"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One revision of a key: the decoded value (``None`` when removed) and its revision."""

    key: str
    value: T | None
    revision: int
    operation: Operation
    created: float = 0.0


def _ttl_header(ttl: float) -> str:
    # The server takes Go durations; it refuses TTLs under one second.
    return f"{max(1000, round(ttl * 1000))}ms"


class KV(Generic[T]):
    """A KV bucket whose values are one msgspec type.

    Keys are already-encoded tokens (see ``rucher.proto.keys.make_key``). Writes that must not
    overwrite a concurrent change pass the ``revision`` they read; losing raises ``conflict``.
    """

    def __init__(self, bus: Bus, bucket: BucketDef, kind: type[T]) -> None:
        self.bus = bus
        self.bucket = bucket
        self.kind = kind
        self._prefix = f"$KV.{bucket.name}."
        self._stream = f"KV_{bucket.name}"

    async def get(self, key: str) -> Entry[T] | None:
        """The current entry of ``key``, or ``None`` when absent, deleted or expired."""
        msg = await read_stream(self.bus.js_read, self._stream, subject=self._prefix + key)
        if msg is None:
            return None
        entry = self._entry(key, msg.data, msg.seq or 0, msg.headers, 0.0)
        return entry if entry.operation is Operation.PUT else None

    async def put(self, key: str, value: T, *, ttl: float | None = None) -> int:
        """Write unconditionally; returns the new revision."""
        return await self._publish(key, encode(value), None, ttl)

    async def create(self, key: str, value: T, *, ttl: float | None = None) -> int:
        """Write only if ``key`` is absent (or removed); raises ``exists`` otherwise."""
        try:
            return await self._publish(key, encode(value), 0, ttl)
        except RucherError as err:
            if err.code is not ErrorCode.CONFLICT:
                raise
        # The key may hold a delete or expiry marker: creation then compares with its revision.
        last = await self._last_revision(key)
        if last is None:
            raise RucherError(ErrorCode.EXISTS, f"{self.bucket.name} key {key} exists")
        try:
            return await self._publish(key, encode(value), last, ttl)
        except RucherError as err:
            if err.code is ErrorCode.CONFLICT:
                raise RucherError(ErrorCode.EXISTS, f"{self.bucket.name} key {key} exists") from err
            raise

    async def update(self, key: str, value: T, *, revision: int, ttl: float | None = None) -> int:
        """Write only if the key's latest revision is still ``revision``."""
        return await self._publish(key, encode(value), revision, ttl)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Remove ``key`` (compare-and-set when ``revision`` is given)."""
        headers = {_KV_OP: Operation.DELETE.value}
        if revision is not None:
            headers[_EXPECTED_LAST_SUBJECT_SEQ] = str(revision)
        await self._send(key, b"", headers)

    async def _last_revision(self, key: str) -> int | None:
        """The revision of a delete/expiry marker holding ``key``, or None if it holds a value."""
        msg = await read_stream(self.bus.js_read, self._stream, subject=self._prefix + key)
        if msg is None:
            return 0
        entry = self._entry(key, msg.data, msg.seq or 0, msg.headers, 0.0)
        return None if entry.operation is Operation.PUT else entry.revision

    async def _publish(self, key: str, data: bytes, last: int | None, ttl: float | None) -> int:
        headers: dict[str, str] = {}
        if last is not None:
            headers[_EXPECTED_LAST_SUBJECT_SEQ] = str(last)
        if ttl is not None:
            headers[_TTL] = _ttl_header(ttl)
        return await self._send(key, data, headers)

    async def _send(self, key: str, data: bytes, headers: dict[str, str]) -> int:
        try:
            ack = await store(self.bus.js, self._prefix + key, data, headers, deduplicated=False)
        except nats.js.errors.APIError as err:
            if err.err_code in _WRONG_LAST_SEQUENCE:
                raise RucherError(
                    ErrorCode.CONFLICT,
                    f"{self.bucket.name} key {key} changed meanwhile",
                    details={"bucket": self.bucket.name, "key": key},
                ) from err
            raise RucherError(ErrorCode.UNAVAILABLE, f"KV write failed: {err}") from err
        return int(ack.seq)

    def _entry(
        self, key: str, data: bytes | None, revision: int, headers: dict[str, str] | None, ts: float
    ) -> Entry[T]:
        operation = Operation.PUT
        if headers:
            if _KV_OP in headers:
                operation = Operation(headers[_KV_OP])
            elif _MARKER_REASON in headers:
                operation = Operation.EXPIRED
        value = decode(data, self.kind) if operation is Operation.PUT and data else None
        if operation is Operation.PUT and value is None:
            operation = Operation.DELETE
        return Entry(key, value, revision, operation, ts)

    async def entries(self, pattern: str = ">") -> list[Entry[T]]:
        """Every current value whose key matches ``pattern``."""
        current: dict[str, Entry[T]] = {}
        async with self.watch(pattern) as watch:
            async for entry in watch:
                if entry is None:
                    break
                if entry.operation is Operation.PUT:
                    current[entry.key] = entry
                else:
                    current.pop(entry.key, None)
        return sorted(current.values(), key=lambda entry: entry.key)

    @contextlib.asynccontextmanager
    async def watch(
        self, pattern: str = ">", *, history: bool = False
    ) -> AsyncIterator[AsyncIterator[Entry[T] | None]]:
        """Watch keys matching ``pattern``, yielding entries as they change.

        The current values come first, then a ``None`` marking "caught up", then every change as
        it happens (removals and expiries included).
        """
        queue: asyncio.Queue[Entry[T] | None] = asyncio.Queue()
        caught_up = False

        async def on_msg(msg: Msg) -> None:
            nonlocal caught_up
            meta = msg.metadata
            key = msg.subject[len(self._prefix) :]
            try:
                entry = self._entry(
                    key, msg.data, meta.sequence.stream, msg.headers, meta.timestamp.timestamp()
                )
            except RucherError:
                entry = Entry(key, None, meta.sequence.stream, Operation.PUT)
            await queue.put(entry)
            if not caught_up and meta.num_pending == 0:
                caught_up = True
                await queue.put(None)

        policy = api.DeliverPolicy.ALL if history else api.DeliverPolicy.LAST_PER_SUBJECT
        deadline = time.monotonic() + FAILOVER_PATIENCE
        while True:
            try:
                sub = await self.bus.js.subscribe(
                    self._prefix + pattern,
                    stream=self._stream,
                    cb=on_msg,
                    ordered_consumer=True,
                    deliver_policy=policy,
                    inactive_threshold=300.0,
                )
                info = await sub.consumer_info()
                break
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as err:
                # nats-py may turn our own cancellation into a timeout: honour the cancel.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from err
                # The bucket's stream may be electing a leader: watching can wait for it.
                if time.monotonic() > deadline:
                    raise RucherError(
                        ErrorCode.UNAVAILABLE, f"cannot watch {self.bucket.name}: {err!r}"
                    ) from err
                await asyncio.sleep(0.1)
        # Empty only if the server has delivered nothing either: a value it sent before this
        # answer may still be on its way to ``on_msg``, which then marks the catching up
        # (``sub.delivered`` counts only what has arrived, so it raced and listed nothing).
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if info.num_pending == 0 and delivered == 0:
            caught_up = True
            await queue.put(None)

        async def updates() -> AsyncIterator[Entry[T] | None]:
            while True:
                yield await queue.get()

        try:
            yield updates()
        finally:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await sub.unsubscribe()
