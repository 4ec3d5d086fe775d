"""Leases ("I hold X until T") with fencing tokens, and leader election on top of them.

A lease is a key in a KV bucket with per-key TTL. Acquiring creates the key (only if absent),
renewing rewrites it with compare-and-set on the revision last written, releasing deletes it.
When the holder stops renewing, the server removes the key at the TTL and leaves a delete
marker, which every watcher receives: that is how expiry is observed cluster-wide.

The fencing token is the KV revision of the acquiring write. Revisions grow across the whole
bucket, so a later acquisition always has a larger token; a renewal keeps the token. Anyone
guarding a resource compares the token presented with the current one (:func:`check_token`).

The holder's own view is conservative: it counts its lease valid until the time it *sent* the
last successful write plus the TTL, which is never later than when the server removes the key
(the server starts the TTL when it stores the write).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import nats.errors
import nats.js.errors
import structlog

from rucher.bus import KV, Bus, Operation, RucherError
from rucher.bus.provision import provision
from rucher.proto.errors import ErrorCode
from rucher.proto.keys import make_key
from rucher.proto.node import LeaseRecord
from rucher.proto.streams import LEASES, BucketDef, node_lease_bucket

log = structlog.get_logger("rucher.leases")

Callback = Callable[[], Coroutine[Any, Any, None]]
RETRY_INTERVAL = 0.25
NODE_LEASE_PREFIX = "ha-node:"


def node_lease_name(node: str) -> str:
    """The name of ``node``'s HA lease (the only key of the node's own lease bucket)."""
    return f"{NODE_LEASE_PREFIX}{node}"


def node_lease_key(node: str) -> str:
    """The key of ``node``'s HA lease."""
    return make_key(node_lease_name(node))


def lease_bucket(name: str) -> BucketDef:
    """The bucket the lease ``name`` lives in: a node's HA lease in the node's own bucket."""
    if name.startswith(NODE_LEASE_PREFIX):
        return node_lease_bucket(name[len(NODE_LEASE_PREFIX) :])
    return LEASES


async def ensure_node_lease_bucket(bus: Bus, node: str) -> BucketDef:
    """Create ``node``'s lease bucket if it does not exist yet; returns its definition."""
    bucket = node_lease_bucket(node)
    try:
        await provision(bus, streams=(), buckets=(bucket,), object_stores=())
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as err:
        raise RucherError(ErrorCode.UNAVAILABLE, f"bucket {bucket.name}: {err}") from err
    return bucket


class Lease:
    """One lease key held by one holder.

    Use :meth:`acquire` or :meth:`try_acquire`, then :meth:`keep` to renew it in the background
    until :meth:`release`.
    """

    def __init__(
        self,
        bus: Bus,
        key: str,
        *,
        holder: str,
        ttl: float,
        bucket: BucketDef = LEASES,
        info: bytes = b"",
        on_lost: Callback | None = None,
    ) -> None:
        if ttl < 1.0:
            raise ValueError("a lease TTL must be at least 1 s (the server's TTL resolution)")
        self.kv: KV[LeaseRecord] = KV(bus, bucket, LeaseRecord)
        self.key = key
        self.holder = holder
        self.ttl = ttl
        self.info = info
        self.on_lost = on_lost
        self.token: int | None = None
        self.revision = 0
        self.deadline = 0.0
        self.lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    @classmethod
    def named(cls, bus: Bus, name: str, **options: object) -> Lease:
        """A lease on a single identifier (encoded into one key token), in its own bucket."""
        options.setdefault("bucket", lease_bucket(name))
        return cls(bus, make_key(name), **options)  # type: ignore[arg-type]

    @property
    def held(self) -> bool:
        """Whether this holder may still act under the lease, by its own conservative clock."""
        return self.token is not None and time.monotonic() < self.deadline

    def _record(self, token: int) -> LeaseRecord:
        return LeaseRecord(
            holder=self.holder, token=token, ttl=self.ttl, renewed=time.time(), info=self.info
        )

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; returns whether this holder now holds it."""
        sent = time.monotonic()
        try:
            revision = await self.kv.create(self.key, self._record(0), ttl=self.ttl)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                return False
            raise
        # The token is the acquiring revision; write it into the record for other readers.
        self.token, self.revision, self.deadline = revision, revision, sent + self.ttl
        self.lost.clear()
        try:
            await self.renew()
        except RucherError as err:
            if err.code is ErrorCode.STALE_TOKEN:
                return False
            # Held but the token is not written yet: the keeper's next renewal writes it.
        return True

    async def acquire(self, timeout: float | None = None) -> int:
        """Wait until the lease is free and take it; returns the fencing token."""
        async with asyncio.timeout(timeout):
            while True:
                if await self.try_acquire():
                    assert self.token is not None
                    return self.token
                await wait_released(self.kv, self.key, self.ttl)

    async def renew(self) -> None:
        """Extend the lease by one TTL; raises ``stale_token`` if it was lost meanwhile."""
        if self.token is None:
            raise RucherError(ErrorCode.STALE_TOKEN, f"lease {self.key} is not held")
        sent = time.monotonic()
        try:
            self.revision = await self.kv.update(
                self.key, self._record(self.token), revision=self.revision, ttl=self.ttl
            )
        except RucherError as err:
            if err.code is not ErrorCode.CONFLICT:
                raise
            # A renewal whose acknowledgement was lost (NATS failing over) may have landed:
            # then the key still holds our token at a newer revision, and the lease is ours.
            entry = await self.kv.get(self.key)
            record = entry.value if entry else None
            if (
                entry is None
                or record is None
                or (record.holder, record.token)
                != (
                    self.holder,
                    self.token,
                )
            ):
                self._mark_lost("taken over or expired")
                raise RucherError(
                    ErrorCode.STALE_TOKEN, f"lease {self.key} was lost", details={"key": self.key}
                ) from err
            self.revision = entry.revision
            await self.renew()
            return
        self.deadline = sent + self.ttl

    async def release(self) -> None:
        """Give the lease up now (others see it free at once)."""
        await self._stop_keeper()
        if self.token is None:
            return
        with contextlib.suppress(RucherError):
            await self.kv.delete(self.key, revision=self.revision)
        self.token = None

    def keep(self, every: float | None = None) -> None:
        """Renew in the background every ``every`` s (default TTL/3) until released or lost."""
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(every or self.ttl / 3))

    async def _keep(self, every: float) -> None:
        while self.token is not None:
            await asyncio.sleep(every)
            while self.token is not None:
                try:
                    await self.renew()
                    break
                except RucherError as err:
                    if err.code is ErrorCode.STALE_TOKEN:
                        return
                    # NATS may be failing over: keep trying while the lease is still ours.
                    if time.monotonic() >= self.deadline:
                        self._mark_lost("could not renew before the deadline")
                        return
                    await asyncio.sleep(RETRY_INTERVAL)
        self._fire_lost()

    def _mark_lost(self, reason: str) -> None:
        if self.token is not None:
            log.warning("lease_lost", key=self.key, holder=self.holder, reason=reason)
        self.token = None
        self._fire_lost()

    def _fire_lost(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        if self.on_lost is not None:
            asyncio.get_running_loop().create_task(self.on_lost())

    async def _stop_keeper(self) -> None:
        if self._keeper is not None and not self._keeper.done():
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        self._keeper = None

    async def __aenter__(self) -> Lease:
        await self.acquire()
        self.keep()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


async def wait_released(kv: KV[LeaseRecord], key: str, ttl: float) -> None:
    """Return once ``key`` is removed or expires (or after one TTL, to look again)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(ttl), kv.watch(key) as updates:
            async for entry in updates:
                if entry is not None and entry.operation is not Operation.PUT:
                    return
                if entry is None and await kv.get(key) is None:
                    return


async def current(bus: Bus, key: str, bucket: BucketDef = LEASES) -> LeaseRecord | None:
    """The lease record under ``key`` now, or None when nobody holds it."""
    entry = await KV(bus, bucket, LeaseRecord).get(key)
    return entry.value if entry else None


async def check_token(bus: Bus, key: str, token: int, bucket: BucketDef = LEASES) -> None:
    """Refuse ``token`` unless it is the fencing token of the lease held under ``key`` now."""
    record = await current(bus, key, bucket)
    if record is None or record.token != token:
        raise RucherError(
            ErrorCode.STALE_TOKEN,
            f"fencing token {token} is stale for {key}",
            details={"key": key, "token": token, "current": record.token if record else None},
        )


class Election:
    """Leader election: every candidate campaigns for one lease; its holder leads.

    ``on_elected`` runs when this candidate becomes leader, ``on_demoted`` when it stops being
    one (lease lost or released). Followers wait on the lease key and campaign again the moment
    it is removed or expires.
    """

    def __init__(
        self,
        bus: Bus,
        name: str,
        *,
        candidate: str,
        ttl: float = 10.0,
        on_elected: Callback | None = None,
        on_demoted: Callback | None = None,
    ) -> None:
        self.lease = Lease.named(bus, f"election:{name}", holder=candidate, ttl=ttl)
        self.on_elected = on_elected
        self.on_demoted = on_demoted
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        """Whether this candidate holds the leadership now."""
        return self.lease.held

    @property
    def token(self) -> int | None:
        """The fencing token of the current term, when leading."""
        return self.lease.token if self.lease.held else None

    async def leader(self) -> str | None:
        """The current leader's name, as stored."""
        entry = await self.lease.kv.get(self.lease.key)
        return entry.value.holder if entry and entry.value else None

    def start(self) -> None:
        """Start campaigning in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._campaign())

    async def _campaign(self) -> None:
        while True:
            try:
                await self.lease.acquire()
            except RucherError as err:
                log.warning("election_campaign_failed", key=self.lease.key, error=err.message)
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            log.info(
                "elected", key=self.lease.key, holder=self.lease.holder, token=self.lease.token
            )
            self.lease.keep()
            if self.on_elected is not None:
                await self.on_elected()
            await self.lease.lost.wait()
            if self.on_demoted is not None:
                await self.on_demoted()

    async def stop(self) -> None:
        """Stop campaigning and hand leadership over at once if held."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        was_leader = self.lease.held
        await self.lease.release()
        if was_leader and self.on_demoted is not None:
            await self.on_demoted()
