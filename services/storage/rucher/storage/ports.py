"""The small interfaces the storage service's logic depends on, so it runs without a bus."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import msgspec

from rucher.proto.base import Address
from rucher.proto.guest import GuestType
from rucher.proto.storage import StorageRecord
from rucher.tasks.ports import TaskBody, TaskLog, TaskSubmitter

__all__ = [
    "DefinitionBook",
    "EventSink",
    "Fetcher",
    "GuestDirectory",
    "TaskBody",
    "TaskLog",
    "TaskSubmitter",
    "UploadInfo",
    "UploadSource",
]

E = TypeVar("E", bound=msgspec.Struct)


class DefinitionBook(Protocol):
    """Where the cluster's storage definitions live (the ``storage`` bucket)."""

    async def get(self, storage: str) -> StorageRecord | None:
        """One storage's record, or None."""
        ...

    async def all(self) -> list[StorageRecord]:
        """Every record, by storage id."""
        ...

    async def create(self, record: StorageRecord) -> None:
        """Add a record; ``exists`` when the id is taken."""
        ...

    async def replace(
        self, storage: str, change: Callable[[StorageRecord], StorageRecord]
    ) -> StorageRecord:
        """Apply ``change`` to the current record by compare-and-set; ``not_found`` if absent."""
        ...

    async def delete(self, storage: str) -> None:
        """Remove a record; ``not_found`` if absent."""
        ...


class GuestDirectory(Protocol):
    """Which guests exist (the ``guests`` bucket), to tell owned volumes from orphans."""

    async def guests(self) -> dict[int, GuestType]:
        """Every guest's VMID and type."""
        ...

    async def running_users(self, volid: str, node: str | None = None) -> list[int]:
        """VMIDs of guests that attach ``volid`` and run; ``unavailable`` if that is unknown.

        With ``node``, only guests that node owns count (a volume of a node-local storage).
        """
        ...


class EventSink(Protocol):
    """Publishes events without holding up the reply that caused them."""

    def emit(self, address: Address[E], event: E) -> None:
        """Publish ``event`` on ``address`` in the background."""
        ...


@dataclass(frozen=True)
class UploadInfo:
    """An object in the ``uploads`` store: its size and SHA-256 digest."""

    name: str
    size: int
    sha256: bytes


class UploadSource(Protocol):
    """The ``uploads`` object store, read chunk by chunk."""

    async def info(self, name: str) -> UploadInfo:
        """The object's size and digest; ``not_found`` when absent or never completed."""
        ...

    def chunks(self, info: UploadInfo) -> AsyncIterator[bytes]:
        """The object's bytes in order; ``invalid`` when the stored chunks end early."""
        ...

    async def delete(self, name: str) -> None:
        """Remove the object."""
        ...


class Fetcher(Protocol):
    """Downloads from an address this node can reach."""

    def fetch(self, url: str, *, verify: bool) -> AsyncIterator[bytes]:
        """The body of ``url`` in chunks; ``invalid`` (field ``url``) when it cannot be had."""
        ...
