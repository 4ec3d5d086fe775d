"""The service's interfaces over NATS and HTTP.

The ``storage`` and ``guests`` buckets, events, the ``uploads`` object store, downloads, and the
replies of commands already applied.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from rucher.bus import KV, Bus, RucherError
from rucher.bus.codec import decode, encode
from rucher.bus.kv import Operation
from rucher.proto import compute, container
from rucher.proto.base import Address, RpcSubject, Scope
from rucher.proto.bus import AppliedCommand
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.keys import decode_token, encode_token, make_key
from rucher.proto.storage import (
    VOLUME_FREED,
    VOLUME_RENAMED,
    StorageRecord,
    VolumeFreed,
    VolumeRenamed,
)
from rucher.proto.streams import GUESTS, IDEMPOTENCY, STORAGE, UPLOADS
from rucher.storage.inuse import attached_volumes
from rucher.storage.ports import E, UploadInfo
from rucher.storage.volnames import invalid

log = structlog.get_logger("rucher.storage.adapters")

T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)

CAS_ATTEMPTS = 5
# How often a new instance checks whether another instance on its node is still registered.
SETTLE_POLL = 1.0
# How long an agent gets to say whether a guest using a volume runs (it answers from memory).
STATUS_TIMEOUT = 5.0
# How long background writes (events, applied-command records) wait, so that the reply which
# caused them reaches the NATS server first.
AFTER_REPLY = 0.002


def _not_found(storage: str) -> RucherError:
    return RucherError(
        ErrorCode.NOT_FOUND, f"storage '{storage}' does not exist", details={"field": "storage"}
    )


class KvDefinitionBook:
    """Definitions in the ``storage`` bucket, with a live cache kept current by a watch."""

    def __init__(self, bus: Bus) -> None:
        self.kv: KV[StorageRecord] = KV(bus, STORAGE, StorageRecord)
        self._cache: dict[str, StorageRecord] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load every definition and follow changes."""
        ready = asyncio.Event()

        async def follow() -> None:
            async with self.kv.watch() as updates:
                async for entry in updates:
                    if entry is None:
                        ready.set()
                        continue
                    storage = decode_token(entry.key)
                    if entry.operation is Operation.PUT and entry.value is not None:
                        self._cache[storage] = entry.value
                    else:
                        self._cache.pop(storage, None)

        self._watcher = asyncio.create_task(follow())
        await ready.wait()

    async def stop(self) -> None:
        """Stop following changes."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def get(self, storage: str) -> StorageRecord | None:
        """From the cache; a miss asks the bucket (a definition made a moment ago elsewhere)."""
        if storage in self._cache:
            return self._cache[storage]
        entry = await self.kv.get(encode_token(storage))
        return entry.value if entry is not None else None

    async def all(self) -> list[StorageRecord]:
        """Every definition, by id."""
        return [self._cache[storage] for storage in sorted(self._cache)]

    async def create(self, record: StorageRecord) -> None:
        """Create-if-absent."""
        await self.kv.create(encode_token(record.definition.storage), record)
        self._cache[record.definition.storage] = record

    async def replace(
        self, storage: str, change: Callable[[StorageRecord], StorageRecord]
    ) -> StorageRecord:
        """Compare-and-set on the revision read, re-reading after a concurrent change."""
        key = encode_token(storage)
        for attempt in range(CAS_ATTEMPTS):
            entry = await self.kv.get(key)
            if entry is None or entry.value is None:
                raise _not_found(storage)
            record = change(entry.value)
            try:
                await self.kv.update(key, record, revision=entry.revision)
            except RucherError as err:
                if err.code is not ErrorCode.CONFLICT or attempt == CAS_ATTEMPTS - 1:
                    raise
                continue
            self._cache[storage] = record
            return record
        raise RucherError(ErrorCode.CONFLICT, f"storage '{storage}' keeps changing")

    async def delete(self, storage: str) -> None:
        """Remove the definition (compare-and-set on what was read)."""
        key = encode_token(storage)
        entry = await self.kv.get(key)
        if entry is None:
            raise _not_found(storage)
        await self.kv.delete(key, revision=entry.revision)
        self._cache.pop(storage, None)


class KvGuestDirectory:
    """Guests from the ``guests`` bucket; whether one runs, from the agent that owns it.

    The bucket says which guests attach a volume and which node owns each; only the owning
    agent knows whether its hypervisor runs the guest now (the registry records configuration,
    not power state, and state events may lag), so it is asked, as Proxmox asks the local QEMU.
    """

    def __init__(self, bus: Bus, *, status_timeout: float = STATUS_TIMEOUT) -> None:
        self.bus = bus
        self.kv: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)
        self.status_timeout = status_timeout

    async def running_users(self, volid: str, node: str | None = None) -> list[int]:
        """VMIDs of guests that attach ``volid`` and are not stopped (owned by ``node``)."""
        users = [
            entry.value
            for entry in await self.kv.entries()
            if entry.value is not None
            and volid in attached_volumes(entry.value.config)
            and (node is None or entry.value.node == node)
        ]
        states = await asyncio.gather(*(self._running(record) for record in users))
        return [record.vmid for record, running in zip(users, states, strict=True) if running]

    async def _running(self, record: GuestRecord) -> bool:
        """Whether the owning agent runs the guest; ``unavailable`` when it cannot be asked."""
        try:
            if record.type is GuestType.LXC:
                ct = await self.bus.request(
                    container.GUEST_STATUS.to(node=record.node),
                    container.CtStatusQuery(vmid=record.vmid),
                    timeout=self.status_timeout,
                )
                state = ct.status
            else:
                vm = await self.bus.request(
                    compute.GUEST_STATUS.to(node=record.node),
                    compute.VmStatusQuery(vmid=record.vmid),
                    timeout=self.status_timeout,
                )
                state = vm.status
        except RucherError as err:
            if err.code is ErrorCode.NOT_FOUND:
                return False  # its agent has no such guest: nothing runs it
            raise RucherError(
                ErrorCode.UNAVAILABLE,
                f"cannot tell whether guest {record.vmid} on node '{record.node}', which uses "
                f"this volume, is running: {err.message}",
                details={"field": "volid", "vmid": record.vmid},
            ) from err
        return state is not PowerState.STOPPED

    async def guests(self) -> dict[int, GuestType]:
        """Every guest's VMID and type."""
        return {
            entry.value.vmid: entry.value.type
            for entry in await self.kv.entries()
            if entry.value is not None
        }


class BusEvents:
    """Publishes events in order, just after the reply that caused them has gone out.

    A reply waits for nothing but the work itself: events (and the records of applied commands)
    are queued, and one worker publishes them a moment later. Failures are logged, never raised.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._queue: asyncio.Queue[tuple[Address[Any], msgspec.Struct]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def emit(self, address: Address[E], event: E) -> None:
        """Queue ``event`` for ``address``."""
        self._queue.put_nowait((address, event))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        while not self._queue.empty():
            await asyncio.sleep(AFTER_REPLY)
            address, event = self._queue.get_nowait()
            try:
                await self.bus.publish(address, event)
            except (RucherError, nats.errors.Error, nats.js.errors.Error) as err:
                log.warning("event_not_published", subject=address.subject, error=repr(err))
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait (up to 5 s) for the events still queued."""
        if self._worker is not None and not self._worker.done():
            await asyncio.wait([self._worker], timeout=5.0)


async def follow_volume_changes(
    bus: Bus, forget: Callable[[str], None]
) -> Callable[[], Awaitable[None]]:
    """Call ``forget(volid)`` for every volume any node frees or renames; returns the stop.

    Plain subscriptions to the events as they are published: a driver's cache of template
    bases only needs to hear of a change, not to replay history.
    """

    async def on_freed(msg: Msg) -> None:
        with contextlib.suppress(RucherError):
            forget(decode(msg.data, VolumeFreed).volid)

    async def on_renamed(msg: Msg) -> None:
        with contextlib.suppress(RucherError):
            event = decode(msg.data, VolumeRenamed)
            forget(event.volid)
            forget(event.new_volid)

    subscriptions = [
        await bus.nc.subscribe(VOLUME_FREED.wildcard(), cb=on_freed),
        await bus.nc.subscribe(VOLUME_RENAMED.wildcard(), cb=on_renamed),
    ]

    async def stop() -> None:
        for subscription in subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    return stop


class ObjectUploads:
    """The ``uploads`` object store, read through an ordered consumer one chunk at a time."""

    def __init__(self, bus: Bus, *, idle_timeout: float = 30.0) -> None:
        self.bus = bus
        self.idle_timeout = idle_timeout
        self._nuids: dict[str, str] = {}

    async def info(self, name: str) -> UploadInfo:
        """Size and digest; an object whose upload never completed has no info."""
        store = await self.bus.js.object_store(UPLOADS.name)
        try:
            info = await store.get_info(name)
        except nats.js.errors.ObjectNotFoundError as err:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"upload '{name}' does not exist or never completed",
                details={"field": "object"},
            ) from err
        digest = (info.digest or "").split("=", 1)[-1]
        sha256 = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)) if digest else b""
        self._nuids[name] = info.nuid
        return UploadInfo(name=name, size=info.size or 0, sha256=sha256)

    async def chunks(self, info: UploadInfo) -> AsyncIterator[bytes]:
        """The stored chunks in order; ``invalid`` when they stop short of the object's size."""
        if info.size == 0:
            return
        nuid = self._nuids.pop(info.name, None) or (await self._nuid(info.name))
        subject = f"$O.{UPLOADS.name}.C.{nuid}"
        received = 0
        # No chunk stored at all: say so now rather than after the idle timeout. (The consumer's
        # own pending count cannot tell: a short object is delivered before it is asked.)
        stored = await self.bus.js.stream_info(f"OBJ_{UPLOADS.name}", subjects_filter=subject)
        if not (stored.state.subjects or {}).get(subject):
            raise _incomplete(info, received)
        sub = await self.bus.js.subscribe(subject, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.idle_timeout)
                except nats.errors.TimeoutError as err:
                    raise _incomplete(info, received) from err
                received += len(msg.data)
                yield msg.data
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await sub.unsubscribe()
        if received != info.size:
            raise _incomplete(info, received)

    async def _nuid(self, name: str) -> str:
        store = await self.bus.js.object_store(UPLOADS.name)
        return (await store.get_info(name)).nuid

    async def delete(self, name: str) -> None:
        """Remove the object and its chunks."""
        store = await self.bus.js.object_store(UPLOADS.name)
        try:
            await store.delete(name)
        except nats.js.errors.ObjectNotFoundError:
            return


def _incomplete(info: UploadInfo, received: int) -> RucherError:
    return invalid(f"upload '{info.name}' is incomplete: {received} of {info.size} bytes", "object")


class HttpFetcher:
    """Downloads over HTTP(S) with httpx, following redirects."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout

    async def fetch(self, url: str, *, verify: bool) -> AsyncIterator[bytes]:
        """The response body in chunks; a refused, failed or cut-off download is ``invalid``."""
        import httpx  # only a download needs it: the idle service stays small

        limits = httpx.Timeout(self.timeout, connect=10.0)
        try:
            async with (
                httpx.AsyncClient(verify=verify, follow_redirects=True, timeout=limits) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code >= 400:
                    raise invalid(
                        f"download of '{url}' failed: {response.status_code} "
                        f"{response.reason_phrase}",
                        "url",
                    )
                async for chunk in response.aiter_bytes():
                    yield chunk
        except httpx.HTTPError as err:
            raise invalid(f"download of '{url}' failed: {err!r}", "url") from err


class AppliedReplies:
    """The reply given to each command id, so a retried command is not applied twice.

    Replies live in the ``idempotency`` bucket (written just after answering) and, for the
    repeats that reach this process at once, in memory: a repeat of a command still running
    waits for its outcome, a repeat of one just answered gets the same reply.

    A node's volume commands reach only that node's storage service, so once :meth:`start` has
    listed the ids already recorded and no other instance is registered on this node any more
    (a predecessor still stopping, or one that crashed until its registration lapses), an id
    that is neither listed nor recorded since is new: no bucket lookup is needed before applying
    it. Cluster-wide commands, which any instance may answer, and every command until then still
    look in the bucket first.
    """

    def __init__(self, bus: Bus, *, remembered: int = 4096) -> None:
        self.kv: KV[AppliedCommand] = KV(bus, IDEMPOTENCY, AppliedCommand)
        self.applier = "storage"
        self.remembered = remembered
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, asyncio.Future[bytes]] = {}
        self._pending: set[asyncio.Task[None]] = set()
        # Ids recorded in the bucket (listed at start, then our own), oldest first, with when.
        self._applied: OrderedDict[str, float] = OrderedDict()
        self._listed = False
        self._settling: asyncio.Task[None] | None = None

    async def start(self, others_on_node: Callable[[], Awaitable[bool]]) -> None:
        """List the ids already recorded; trust the list once ``others_on_node()`` is False."""
        entries = await self.kv.entries(f"{encode_token(self.applier)}.>")
        listed = sorted(
            (entry.value.time, decode_token(entry.key.rsplit(".", 1)[-1]))
            for entry in entries
            if entry.value is not None
        )
        for recorded, command_id in listed:
            self._applied[command_id] = recorded

        async def settle() -> None:
            while True:
                with contextlib.suppress(RucherError):
                    if not await others_on_node():
                        break
                await asyncio.sleep(SETTLE_POLL)
            self._listed = True
            log.info("applied_commands_listed", count=len(self._applied))

        self._settling = asyncio.create_task(settle())

    async def stop(self) -> None:
        """Stop waiting for other instances to go."""
        if self._settling is not None:
            self._settling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settling

    def once(
        self, subject: RpcSubject[T, R], operation: Callable[[T], Awaitable[R]]
    ) -> Callable[[T, dict[str, str]], Awaitable[R]]:
        """A handler answering a repeated ``command_id`` with the first reply, not a rerun."""

        async def handle(message: T, _headers: dict[str, str]) -> R:
            command_id = getattr(message, "command_id", None)
            if command_id is None:
                return await operation(message)
            if command_id in self._recent:
                return decode(self._recent[command_id], subject.reply)
            if command_id in self._running:
                return decode(await asyncio.shield(self._running[command_id]), subject.reply)
            outcome: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._running[command_id] = outcome
            try:
                known = await self.known(command_id, node=subject.scope is Scope.NODE)
                reply = decode(known, subject.reply) if known is not None else None
                if reply is None:
                    reply = await operation(message)
                    task = asyncio.create_task(self.record(command_id, encode(reply), AFTER_REPLY))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
                self._remember(command_id, encode(reply))
                outcome.set_result(self._recent[command_id])
            except asyncio.CancelledError:
                outcome.cancel()
                raise
            except BaseException as err:
                outcome.set_exception(err)
                outcome.exception()  # a repeat may not be waiting: do not warn about it
                raise
            finally:
                del self._running[command_id]
            return reply

        return handle

    def _remember(self, command_id: str, reply: bytes) -> None:
        self._recent[command_id] = reply
        while len(self._recent) > self.remembered:
            self._recent.popitem(last=False)

    def _key(self, command_id: str) -> str:
        return make_key(self.applier, command_id)

    async def known(self, command_id: str, *, node: bool = False) -> bytes | None:
        """The encoded reply already given to ``command_id``, if any.

        For a ``node`` command the list of recorded ids answers "none" without a lookup, once
        it can be trusted (see the class).
        """
        if node and self._listed and command_id not in self._applied:
            return None
        entry = await self.kv.get(self._key(command_id))
        return entry.value.reply if entry is not None and entry.value is not None else None

    async def record(self, command_id: str, reply: bytes, delay: float = 0.0) -> None:
        """Remember the reply (best effort: a lost record only weakens de-duplication)."""
        now = time.time()
        self._applied[command_id] = now
        while self._applied and next(iter(self._applied.values())) < now - IDEMPOTENCY.max_age:
            self._applied.popitem(last=False)  # the bucket has forgotten it too
        await asyncio.sleep(delay)
        record = AppliedCommand(applier=self.applier, time=now, reply=reply)
        try:
            await self.kv.put(self._key(command_id), record)
        except RucherError as err:
            log.warning("applied_reply_not_recorded", command_id=command_id, error=err.message)
