"""The storage driver interface: what the storage service asks of one backend on this node.

One driver instance serves one storage definition. Names passed in and out are Proxmox volume
names within that storage (see :mod:`rucher.storage.volnames`). Every method may raise
:class:`~rucher.bus.RucherError` with a code and, for bad input, ``details.field``; drivers run
blocking work (``qemu-img``, librbd) off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rucher.proto.storage import ContentType, StorageDefinition, VolumeMapping


@dataclass(frozen=True)
class Volume:
    """One volume as its driver sees it: ``name`` is the volume name, ``parent`` its base's.

    ``path`` (what ``pvesm path`` prints) and, for RBD, ``used`` are filled for one volume read
    alone (:meth:`StorageDriver.volume`), not in listings.
    """

    name: str
    content: ContentType
    format: str
    size: int
    vmid: int | None = None
    parent: str | None = None
    used: int | None = None
    protected: bool = False
    notes: str = ""
    ctime: int | None = None
    path: str | None = None


@dataclass(frozen=True)
class Capacity:
    """A storage's space as this node sees it, in bytes."""

    total: int
    used: int
    avail: int
    active: bool = True


@dataclass(frozen=True)
class NewDisk:
    """What to allocate: owner, size in bytes, format, and a name (None: the next free one)."""

    vmid: int
    size: int
    format: str
    name: str | None = None
    content: ContentType = ContentType.IMAGES


class StorageDriver(Protocol):
    """One storage backend (``dir``, ``rbd``) serving one storage definition on this node."""

    definition: StorageDefinition

    def formats(self, content: ContentType) -> tuple[str, ...]:
        """Disk formats a new volume of ``content`` may have here; the first is the default."""
        ...

    async def status(self) -> Capacity:
        """Total, used and available space; ``active`` False when the backend is unreachable."""
        ...

    async def list_volumes(
        self, content: ContentType | None = None, vmid: int | None = None
    ) -> list[Volume]:
        """Every volume, optionally only of one owner or content type.

        ``images`` or ``rootdir`` return every disk: which are a container's is the service's to
        tell (from the guest registry), as Proxmox does from its VM list.
        """
        ...

    async def volume(self, name: str, *, detail: bool = False) -> Volume:
        """One volume; ``not_found`` when it does not exist.

        ``detail`` also asks for what costs more to learn: its path, and its usage where the
        backend must ask a cluster for it (RBD).
        """
        ...

    async def allocate(self, disk: NewDisk) -> Volume:
        """Create a disk; ``exists`` when the name is taken. Nothing is left if it fails."""
        ...

    async def free(self, name: str) -> None:
        """Delete a volume with its snapshots; refused while linked clones depend on it."""
        ...

    async def resize(self, name: str, size: int) -> Volume:
        """Grow a disk to ``size`` bytes."""
        ...

    async def snapshot_create(self, name: str, snapshot: str) -> None:
        """Take a snapshot of a disk; ``exists`` when the name is taken."""
        ...

    async def snapshot_rollback(self, name: str, snapshot: str) -> None:
        """Roll a disk back to a snapshot."""
        ...

    async def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Delete a snapshot; refused while linked clones depend on it."""
        ...

    async def snapshots(self, name: str) -> list[str]:
        """The names of a disk's snapshots, oldest first."""
        ...

    async def children(self, name: str) -> list[str]:
        """Volume names of the linked clones that depend on this volume."""
        ...

    async def create_base(self, name: str) -> Volume:
        """Turn a disk into a template base (renamed ``base-``, read-only, protected)."""
        ...

    async def clone_linked(
        self, name: str, snapshot: str | None, vmid: int, target: str | None
    ) -> Volume:
        """A copy-on-write clone of a base for ``vmid``."""
        ...

    async def copy(self, name: str, snapshot: str | None, disk: NewDisk) -> Volume:
        """A full copy of a disk (or of one of its snapshots) within this storage."""
        ...

    async def export_raw(self, name: str, snapshot: str | None, target: Path) -> None:
        """Write a disk's content as a raw image file (a copy to another storage)."""
        ...

    async def import_raw(self, source: Path, disk: NewDisk) -> Volume:
        """Create a disk from a raw image file (a copy from another storage)."""
        ...

    async def rename(self, name: str, vmid: int, target: str | None) -> Volume:
        """Give a disk to another owner under a new name."""
        ...

    async def set_attributes(self, name: str, notes: str | None, protected: bool | None) -> Volume:
        """Change a volume's notes or protection."""
        ...

    async def map(self, name: str) -> VolumeMapping:
        """Where and how the hypervisor reaches a volume."""
        ...

    async def file_target(self, content: ContentType, filename: str) -> Path:
        """The final path of an uploaded or downloaded file (ISO, template); ``exists`` if taken."""
        ...

    def forget(self, name: str) -> None:
        """Drop anything cached about a volume that was freed or renamed (here or elsewhere)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
