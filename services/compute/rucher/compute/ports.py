"""What the compute agent's logic needs from the rest of Rucher: tasks, guest documents, events."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from rucher.proto.base import Subject
from rucher.proto.guest import GuestLock, GuestRecord, GuestType
from rucher.tasks.ports import TaskBody, TaskLog, TaskSubmitter

__all__ = ["EventSink", "GuestStore", "TaskBody", "TaskLog", "TaskSubmitter"]


class GuestStore(Protocol):
    """The cluster's guest documents (``rucher.guests.GuestRegistry``)."""

    async def get(self, vmid: int) -> GuestRecord:
        """One document, or ``not_found``."""

    async def list(
        self, *, node: str | None = None, guest_type: GuestType | None = None
    ) -> list[GuestRecord]:
        """Documents, filtered."""

    async def register(
        self,
        *,
        guest_type: GuestType,
        node: str,
        config: Mapping[str, str],
        vmid: int | None = None,
        lock: GuestLock | None = GuestLock.CREATE,
    ) -> GuestRecord:
        """Take ``vmid`` and write its first document."""

    async def update(
        self,
        vmid: int,
        *,
        changes: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        digest: str | None = None,
        lock_held: GuestLock | None = None,
    ) -> GuestRecord:
        """Change config keys."""

    async def clear_lock(self, vmid: int, lock: GuestLock) -> GuestRecord:
        """Release a lock."""

    async def set_lock(
        self, vmid: int, lock: GuestLock, *, digest: str | None = None
    ) -> GuestRecord:
        """Take a lock on an unlocked guest."""

    async def rewrite(
        self,
        vmid: int,
        change: Callable[[GuestRecord], GuestRecord],
        *,
        digest: str | None = None,
        lock_held: GuestLock | None = None,
    ) -> GuestRecord:
        """Replace config, snapshots or pending section by ``change`` of the current document."""

    async def remove(
        self, vmid: int, *, digest: str | None = None, lock_held: GuestLock | None = None
    ) -> None:
        """Delete a document."""

    async def transfer(
        self, vmid: int, *, from_node: str, to_node: str, token: int = 0
    ) -> GuestRecord:
        """Move ownership in one atomic write, fenced by ``token``."""


class EventSink(Protocol):
    """Publishes this node's events (failures are logged, never raised)."""

    async def emit(self, subject: Subject[Any], event: Any) -> None:
        """Publish ``event`` on ``subject`` for this node."""
