"""The cluster-wide guest registry: one document per VM or container, keyed by VMID."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from rucher.proto.base import Event, Kind, Scope, Subject

FIRST_VMID = 100
LAST_VMID = 999_999_999


class GuestType(StrEnum):
    """Proxmox's guest kinds, by their API names."""

    QEMU = "qemu"
    LXC = "lxc"


class GuestLock(StrEnum):
    """The locks Proxmox puts on a guest config while an operation holds it."""

    BACKUP = "backup"
    CLONE = "clone"
    CREATE = "create"
    DISK = "disk"
    MIGRATE = "migrate"
    MOUNTED = "mounted"
    ROLLBACK = "rollback"
    SNAPSHOT = "snapshot"
    SNAPSHOT_DELETE = "snapshot-delete"
    SUSPENDED = "suspended"
    SUSPENDING = "suspending"


class GuestRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The ``guests`` bucket's value for one guest.

    ``config`` holds Proxmox's config keys as strings (``memory``, ``net0``...). ``digest`` is the
    SHA-1 of the canonical config and lock, as Proxmox's config digest: a writer passes the digest
    it read and loses with a conflict if the document changed meanwhile. ``owner_token`` is the
    fencing token of the lease under which ``node`` took ownership (0 when none was used).
    ``snapshots`` are Proxmox's ``[snapname]`` sections (each a config copy with ``snaptime``,
    ``description``, ``parent``...); ``pending`` and ``pending_delete`` are its ``[PENDING]``
    section: changes a running guest gets at its next start.
    """

    vmid: int
    type: GuestType
    node: str
    config: dict[str, str]
    digest: str
    lock: GuestLock | None = None
    owner_token: int = 0
    updated: float = 0.0
    snapshots: dict[str, dict[str, str]] = {}
    pending: dict[str, str] = {}
    pending_delete: tuple[str, ...] = ()


class GuestRegistered(Event, frozen=True, kw_only=True, tag="guest.registered"):
    """A VMID was allocated and its first config written."""

    vmid: int
    guest_type: GuestType
    owner: str


class GuestConfigChanged(Event, frozen=True, kw_only=True, tag="guest.config_changed"):
    """A guest's config or lock changed; ``digest`` is the new digest."""

    vmid: int
    digest: str
    lock: GuestLock | None = None


class GuestOwnerChanged(Event, frozen=True, kw_only=True, tag="guest.owner_changed"):
    """Ownership of a guest moved from one node to another (migration, HA recovery)."""

    vmid: int
    previous: str
    owner: str
    owner_token: int


class GuestRemoved(Event, frozen=True, kw_only=True, tag="guest.removed"):
    """A guest was destroyed and its VMID freed."""

    vmid: int


GUEST_REGISTERED = Subject(
    "evt.guest.registered.{node}", GuestRegistered, Kind.EVENT, Scope.NODE, "A guest was created."
)
GUEST_CONFIG_CHANGED = Subject(
    "evt.guest.config_changed.{node}",
    GuestConfigChanged,
    Kind.EVENT,
    Scope.NODE,
    "A guest's config or lock changed.",
)
GUEST_OWNER_CHANGED = Subject(
    "evt.guest.owner_changed.{node}",
    GuestOwnerChanged,
    Kind.EVENT,
    Scope.NODE,
    "A guest changed owner node.",
)
GUEST_REMOVED = Subject(
    "evt.guest.removed.{node}", GuestRemoved, Kind.EVENT, Scope.NODE, "A guest was destroyed."
)
