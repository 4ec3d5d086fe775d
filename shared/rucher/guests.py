"""The cluster-wide guest registry: VMIDs, config documents, digests, locks and ownership.

Every write is a compare-and-set on the KV revision it read, so concurrent writers never lose
each other's changes silently: a writer that passes the ``digest`` it saw gets ``conflict`` if
the document changed, as Proxmox answers "detected modified configuration".
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from rucher.bus import KV, Bus, RucherError
from rucher.bus.client import new_id
from rucher.proto.base import Subject
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import (
    FIRST_VMID,
    GUEST_CONFIG_CHANGED,
    GUEST_OWNER_CHANGED,
    GUEST_REGISTERED,
    GUEST_REMOVED,
    LAST_VMID,
    GuestConfigChanged,
    GuestLock,
    GuestOwnerChanged,
    GuestRecord,
    GuestRegistered,
    GuestRemoved,
    GuestType,
)
from rucher.proto.streams import GUESTS

E = TypeVar("E", bound=msgspec.Struct)

MODIFIED = "detected modified configuration - file changed by other user? Try again."


def config_digest(config: Mapping[str, str], lock: GuestLock | None) -> str:
    """SHA-1 over the canonical config and lock, hex, like Proxmox's config ``digest``."""
    canonical = msgspec.json.encode({"config": dict(sorted(config.items())), "lock": lock})
    return hashlib.sha1(canonical, usedforsecurity=False).hexdigest()


def _key(vmid: int) -> str:
    return str(vmid)


def _check_vmid(vmid: int) -> None:
    if not FIRST_VMID <= vmid <= LAST_VMID:
        raise RucherError(
            ErrorCode.INVALID,
            f"invalid VMID {vmid}: must be between {FIRST_VMID} and {LAST_VMID}",
            details={"field": "vmid"},
        )


class GuestRegistry:
    """Allocate VMIDs and read or change guest documents, cluster-wide."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.kv: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)

    async def get(self, vmid: int) -> GuestRecord:
        """The document of ``vmid``; ``not_found`` when there is none."""
        entry = await self.kv.get(_key(vmid))
        if entry is None or entry.value is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"VM {vmid} does not exist")
        return entry.value

    async def list(
        self, *, node: str | None = None, guest_type: GuestType | None = None
    ) -> list[GuestRecord]:
        """Every guest, optionally only one node's or one type's, by VMID."""
        records = [entry.value for entry in await self.kv.entries() if entry.value is not None]
        return sorted(
            (
                record
                for record in records
                if (node is None or record.node == node)
                and (guest_type is None or record.type is guest_type)
            ),
            key=lambda record: record.vmid,
        )

    async def next_id(self, vmid: int | None = None) -> int:
        """``/cluster/nextid``: the lowest free VMID, or ``vmid`` itself if it is free."""
        taken = {int(entry.key) for entry in await self.kv.entries()}
        if vmid is not None:
            _check_vmid(vmid)
            if vmid in taken:
                raise RucherError(
                    ErrorCode.EXISTS, f"VM {vmid} already exists", details={"field": "vmid"}
                )
            return vmid
        candidate = FIRST_VMID
        while candidate in taken:
            candidate += 1
        return candidate

    async def register(
        self,
        *,
        guest_type: GuestType,
        node: str,
        config: Mapping[str, str],
        vmid: int | None = None,
        lock: GuestLock | None = GuestLock.CREATE,
    ) -> GuestRecord:
        """Create a guest's document, atomically taking ``vmid`` (or the lowest free one)."""
        while True:
            chosen = await self.next_id(vmid)
            record = GuestRecord(
                vmid=chosen,
                type=guest_type,
                node=node,
                config=dict(config),
                digest=config_digest(config, lock),
                lock=lock,
                updated=time.time(),
            )
            try:
                await self.kv.create(_key(chosen), record)
            except RucherError as err:
                if err.code is ErrorCode.EXISTS and vmid is None:
                    continue  # another creator took that id first: try the next free one
                if err.code is ErrorCode.EXISTS:
                    raise RucherError(
                        ErrorCode.EXISTS, f"VM {vmid} already exists", details={"field": "vmid"}
                    ) from err
                raise
            await self._emit(
                GUEST_REGISTERED,
                GuestRegistered(**self._event(), vmid=chosen, guest_type=guest_type, owner=node),
            )
            return record

    async def update(
        self,
        vmid: int,
        *,
        changes: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        digest: str | None = None,
        lock_held: GuestLock | None = None,
    ) -> GuestRecord:
        """Change config keys. ``digest`` makes it conditional on the document seen.

        A locked guest is refused (``locked``) unless the caller holds that lock (``lock_held``).
        """
        removed = list(delete)

        def change(record: GuestRecord) -> GuestRecord:
            _check_unlocked(record, lock_held)
            overlap = set(removed) & set(changes or {})
            if overlap:
                raise RucherError(
                    ErrorCode.INVALID,
                    f"cannot set and delete {sorted(overlap)} at once",
                    details={"field": "delete"},
                )
            config = {**record.config, **(changes or {})}
            for name in removed:
                config.pop(name, None)
            return _rebuild(record, config=config)

        record = await self._modify(vmid, change, digest)
        await self._emit_config_changed(record)
        return record

    async def rewrite(
        self,
        vmid: int,
        change: Callable[[GuestRecord], GuestRecord],
        *,
        digest: str | None = None,
        lock_held: GuestLock | None = None,
    ) -> GuestRecord:
        """Replace a document's config, snapshots or pending section by ``change`` of the current.

        ``change`` may run more than once (a concurrent writer makes the compare-and-set retry);
        it must not change the VMID, type, owner or lock, which other methods guard.
        """

        def guarded(record: GuestRecord) -> GuestRecord:
            _check_unlocked(record, lock_held)
            changed = change(record)
            kept = (changed.vmid, changed.type, changed.node, changed.lock)
            if kept != (record.vmid, record.type, record.node, record.lock):
                raise RucherError(
                    ErrorCode.INTERNAL, f"a rewrite of VM {vmid} may not change its identity"
                )
            return _rebuild(changed)

        record = await self._modify(vmid, guarded, digest)
        await self._emit_config_changed(record)
        return record

    async def set_lock(
        self, vmid: int, lock: GuestLock, *, digest: str | None = None
    ) -> GuestRecord:
        """Take ``lock`` on an unlocked guest (``locked`` if another lock is set)."""

        def change(record: GuestRecord) -> GuestRecord:
            _check_unlocked(record, None)
            return _rebuild(record, lock=lock)

        record = await self._modify(vmid, change, digest)
        await self._emit_config_changed(record)
        return record

    async def clear_lock(self, vmid: int, lock: GuestLock) -> GuestRecord:
        """Release ``lock``; a no-op if it is not the lock held."""

        def change(record: GuestRecord) -> GuestRecord:
            return _rebuild(record, lock=None) if record.lock is lock else record

        record = await self._modify(vmid, change, None)
        await self._emit_config_changed(record)
        return record

    async def transfer(
        self, vmid: int, *, from_node: str, to_node: str, token: int = 0
    ) -> GuestRecord:
        """Move ownership from ``from_node`` to ``to_node`` in one atomic write.

        ``token`` is the fencing token of the lease that authorises the move (HA manager,
        migration): a token older than the one the current owner got the guest with is refused.
        """

        def change(record: GuestRecord) -> GuestRecord:
            if record.node != from_node:
                raise RucherError(
                    ErrorCode.CONFLICT,
                    f"VM {vmid} is on node {record.node}, not {from_node}",
                    details={"node": record.node},
                )
            if token < record.owner_token:
                raise RucherError(
                    ErrorCode.STALE_TOKEN,
                    f"fencing token {token} is older than {record.owner_token} for VM {vmid}",
                )
            return _rebuild(record, node=to_node, owner_token=token)

        record = await self._modify(vmid, change, None)
        await self._emit(
            GUEST_OWNER_CHANGED,
            GuestOwnerChanged(
                **self._event(),
                vmid=vmid,
                previous=from_node,
                owner=to_node,
                owner_token=token,
            ),
        )
        return record

    async def remove(
        self, vmid: int, *, digest: str | None = None, lock_held: GuestLock | None = None
    ) -> None:
        """Delete a guest's document and free its VMID."""
        while True:
            entry = await self.kv.get(_key(vmid))
            if entry is None or entry.value is None:
                raise RucherError(ErrorCode.NOT_FOUND, f"VM {vmid} does not exist")
            _check_digest(entry.value, digest)
            _check_unlocked(entry.value, lock_held)
            try:
                await self.kv.delete(_key(vmid), revision=entry.revision)
            except RucherError as err:
                if err.code is ErrorCode.CONFLICT:
                    continue
                raise
            break
        await self._emit(GUEST_REMOVED, GuestRemoved(**self._event(), vmid=vmid))

    async def _modify(
        self, vmid: int, change: Callable[[GuestRecord], GuestRecord], digest: str | None
    ) -> GuestRecord:
        while True:
            entry = await self.kv.get(_key(vmid))
            if entry is None or entry.value is None:
                raise RucherError(ErrorCode.NOT_FOUND, f"VM {vmid} does not exist")
            _check_digest(entry.value, digest)
            record = change(entry.value)
            if record is entry.value:
                return record
            try:
                await self.kv.update(_key(vmid), record, revision=entry.revision)
            except RucherError as err:
                if err.code is ErrorCode.CONFLICT:
                    continue  # re-read: with a digest, the check above now fails as it must
                raise
            return record

    def _event(self) -> dict[str, Any]:
        return {"event_id": new_id(), "node": self.bus.node, "time": time.time()}

    async def _emit_config_changed(self, record: GuestRecord) -> None:
        await self._emit(
            GUEST_CONFIG_CHANGED,
            GuestConfigChanged(
                **self._event(), vmid=record.vmid, digest=record.digest, lock=record.lock
            ),
        )

    async def _emit(self, subject: Subject[E], event: E) -> None:
        # The document is the truth; events tell watchers sooner. A lost event is caught up
        # by anyone reconciling from the bucket, so a failed publish does not fail the write.
        with contextlib.suppress(RucherError):
            await self.bus.publish(subject.to(node=self.bus.node), event)


def _rebuild(record: GuestRecord, **changes: object) -> GuestRecord:
    updated = msgspec.structs.replace(record, **changes, updated=time.time())
    return msgspec.structs.replace(updated, digest=config_digest(updated.config, updated.lock))


def _check_digest(record: GuestRecord, digest: str | None) -> None:
    if digest is not None and digest != record.digest:
        raise RucherError(
            ErrorCode.CONFLICT,
            MODIFIED,
            details={"field": "digest", "current": record.digest},
        )


def _check_unlocked(record: GuestRecord, lock_held: GuestLock | None) -> None:
    if record.lock is not None and record.lock is not lock_held:
        raise RucherError(
            ErrorCode.LOCKED, f"VM is locked ({record.lock})", details={"lock": record.lock}
        )
