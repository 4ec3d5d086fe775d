"""Containers (Proxmox ``pct``): lifecycle commands to a node's container agent, and its events.

The same family as :mod:`rucher.proto.compute`, with Proxmox's container parameters: requests to
the agent of the owning node (``rpc.container.<name>.{node}``), answered with the task's UPID.
Containers relocate (stop, move, start) rather than live-migrate, as in Proxmox.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.common import (
    ByteSize,
    ConfigKey,
    CpuShare,
    Digest,
    GuestCommand,
    NodeName,
    PoolId,
    PowerState,
    Query,
    Seconds,
    SnapshotName,
    StorageId,
    Vmid,
    VolumeId,
)
from rucher.proto.guest import GuestLock
from rucher.proto.task import TaskAccepted

Timeout = Annotated[int, msgspec.Meta(ge=0, description="Seconds to wait at most.")]
BandwidthLimit = Annotated[float, msgspec.Meta(ge=0, description="I/O limit in KiB/s; 0 = none.")]
MountKey = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(rootfs|mp([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5]))$",
        description="A container volume's config key: rootfs or mpN.",
    ),
]


class CtDriftKind(StrEnum):
    """What reconciliation found between the container runtime and the guest registry."""

    UNKNOWN_CONTAINER = "unknown_container"
    MISSING_CONTAINER = "missing_container"
    STATE_MISMATCH = "state_mismatch"
    ORPHAN_VOLUME = "orphan_volume"
    ADOPTED = "adopted"


# Commands ------------------------------------------------------------------------------------


class CtCreate(GuestCommand, frozen=True, kw_only=True, tag="container.guest.create"):
    """Create a container from an OS template and Proxmox config keys (``rootfs``, ``net0``...)."""

    ostemplate: VolumeId
    config: dict[ConfigKey, str] = {}
    storage: StorageId = "local"
    start: bool = False
    pool: PoolId | None = None
    claim_id: str | None = None


class CtStart(GuestCommand, frozen=True, kw_only=True, tag="container.guest.start"):
    """Start a container; the agent refuses an ``owner_token`` older than the registry's."""

    debug: bool = False
    skiplock: bool = False
    owner_token: int = 0
    claim_id: str | None = None


class CtStop(GuestCommand, frozen=True, kw_only=True, tag="container.guest.stop"):
    """Stop a container at once."""

    skiplock: bool = False
    overrule_shutdown: bool = False


class CtShutdown(GuestCommand, frozen=True, kw_only=True, tag="container.guest.shutdown"):
    """Ask a container's init to power off; with ``force_stop``, stop it after ``timeout``."""

    timeout: Timeout = 60
    force_stop: bool = False


class CtReboot(GuestCommand, frozen=True, kw_only=True, tag="container.guest.reboot"):
    """Shut a container down and start it again, applying pending changes."""

    timeout: Timeout | None = None


class CtSuspend(GuestCommand, frozen=True, kw_only=True, tag="container.guest.suspend"):
    """Freeze a container's processes."""


class CtResume(GuestCommand, frozen=True, kw_only=True, tag="container.guest.resume"):
    """Thaw a frozen container; ``owner_token`` as for start."""

    owner_token: int = 0


class CtDestroy(GuestCommand, frozen=True, kw_only=True, tag="container.guest.destroy"):
    """Destroy a container and its volumes, and free its VMID."""

    purge: bool = False
    destroy_unreferenced_disks: bool = False
    force: bool = False


class CtConfigUpdate(GuestCommand, frozen=True, kw_only=True, tag="container.guest.config_update"):
    """Change a container's config: set keys, delete keys, revert pending; guarded by digest."""

    config: dict[ConfigKey, str] = {}
    delete: tuple[ConfigKey, ...] = ()
    revert: tuple[ConfigKey, ...] = ()
    digest: Digest | None = None


class CtMigrate(GuestCommand, frozen=True, kw_only=True, tag="container.guest.migrate"):
    """Move a container to ``target``; a running one is restarted there when ``restart``."""

    target: NodeName
    online: bool = False
    restart: bool = False
    timeout: Timeout = 180
    target_storage: str | None = None
    bwlimit: BandwidthLimit | None = None
    claim_id: str | None = None


class CtSnapshotCreate(GuestCommand, frozen=True, kw_only=True, tag="container.snapshot.create"):
    """Snapshot a container's volumes."""

    snapname: SnapshotName
    description: str = ""


class CtSnapshotRollback(
    GuestCommand, frozen=True, kw_only=True, tag="container.snapshot.rollback"
):
    """Roll a container back to a snapshot, then start it if ``start``."""

    snapname: SnapshotName
    start: bool = False


class CtSnapshotDelete(GuestCommand, frozen=True, kw_only=True, tag="container.snapshot.delete"):
    """Delete a container snapshot."""

    snapname: SnapshotName
    force: bool = False


class CtClone(GuestCommand, frozen=True, kw_only=True, tag="container.guest.clone"):
    """Clone a container (or a template, linked unless ``full``) into ``newid``."""

    newid: Vmid
    full: bool | None = None
    target: NodeName | None = None
    storage: StorageId | None = None
    hostname: str | None = None
    description: str | None = None
    pool: PoolId | None = None
    snapname: SnapshotName | None = None
    bwlimit: BandwidthLimit | None = None
    claim_id: str | None = None


class CtTemplate(GuestCommand, frozen=True, kw_only=True, tag="container.guest.template"):
    """Turn a stopped container into a template."""


class CtDiskResize(GuestCommand, frozen=True, kw_only=True, tag="container.disk.resize"):
    """Grow a container volume to ``size`` bytes, or by ``size`` when ``relative``."""

    disk: MountKey
    size: ByteSize
    relative: bool = False
    digest: Digest | None = None


# Queries and their replies -------------------------------------------------------------------


class CtStatusQuery(Query, frozen=True, kw_only=True, tag="container.guest.status"):
    """Ask the owning agent for a container's current state and counters."""

    vmid: Vmid


class CtStatusReport(Reply, frozen=True, kw_only=True, tag="container.guest.status_report"):
    """A container's current state and counters, as ``GET .../status/current`` reports them."""

    vmid: Vmid
    status: PowerState
    name: str = ""
    uptime: Seconds = 0.0
    cpu: CpuShare = 0.0
    cpus: float = 0.0
    mem: ByteSize = 0
    maxmem: ByteSize = 0
    swap: ByteSize = 0
    maxswap: ByteSize = 0
    disk: ByteSize = 0
    maxdisk: ByteSize = 0
    diskread: ByteSize = 0
    diskwrite: ByteSize = 0
    netin: ByteSize = 0
    netout: ByteSize = 0
    pid: int | None = None
    lock: GuestLock | None = None
    template: bool = False
    tags: tuple[str, ...] = ()


# Events --------------------------------------------------------------------------------------


class CtCreated(Event, frozen=True, kw_only=True, tag="container.guest.created"):
    """A container was created on its node with its volumes."""

    vmid: Vmid
    hostname: str = ""
    upid: str | None = None


class CtStateChanged(Event, frozen=True, kw_only=True, tag="container.guest.state_changed"):
    """A container's run state changed, by a command or on its own."""

    vmid: Vmid
    state: PowerState
    previous: PowerState | None = None
    reason: str = ""
    upid: str | None = None


class CtMigrated(Event, frozen=True, kw_only=True, tag="container.guest.migrated"):
    """A container moved from this node to ``target``, which owns it now."""

    vmid: Vmid
    target: NodeName
    restarted: bool
    upid: str | None = None


class CtDestroyed(Event, frozen=True, kw_only=True, tag="container.guest.destroyed"):
    """A container and its volumes were removed from its node."""

    vmid: Vmid
    upid: str | None = None


class CtDriftDetected(Event, frozen=True, kw_only=True, tag="container.guest.drift_detected"):
    """Reconciliation found the container runtime and the registry disagreeing."""

    kind: CtDriftKind
    vmid: Vmid | None = None
    instance: str | None = None
    detail: str = ""


# Subjects ------------------------------------------------------------------------------------

GUEST_CREATE = RpcSubject(
    "rpc.container.guest_create.{node}",
    CtCreate,
    Kind.RPC,
    Scope.NODE,
    "Create a container on {node}; answers with the create task's UPID.",
    reply=TaskAccepted,
)
GUEST_START = RpcSubject(
    "rpc.container.guest_start.{node}",
    CtStart,
    Kind.RPC,
    Scope.NODE,
    "Start a container on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_STOP = RpcSubject(
    "rpc.container.guest_stop.{node}",
    CtStop,
    Kind.RPC,
    Scope.NODE,
    "Stop a container on {node} at once; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_SHUTDOWN = RpcSubject(
    "rpc.container.guest_shutdown.{node}",
    CtShutdown,
    Kind.RPC,
    Scope.NODE,
    "Shut a container on {node} down gracefully; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_REBOOT = RpcSubject(
    "rpc.container.guest_reboot.{node}",
    CtReboot,
    Kind.RPC,
    Scope.NODE,
    "Reboot a container on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_SUSPEND = RpcSubject(
    "rpc.container.guest_suspend.{node}",
    CtSuspend,
    Kind.RPC,
    Scope.NODE,
    "Freeze a container on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_RESUME = RpcSubject(
    "rpc.container.guest_resume.{node}",
    CtResume,
    Kind.RPC,
    Scope.NODE,
    "Thaw a container on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_DESTROY = RpcSubject(
    "rpc.container.guest_destroy.{node}",
    CtDestroy,
    Kind.RPC,
    Scope.NODE,
    "Destroy a container on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_CONFIG_UPDATE = RpcSubject(
    "rpc.container.guest_config_update.{node}",
    CtConfigUpdate,
    Kind.RPC,
    Scope.NODE,
    "Change a container's config on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_MIGRATE = RpcSubject(
    "rpc.container.guest_migrate.{node}",
    CtMigrate,
    Kind.RPC,
    Scope.NODE,
    "Move a container from {node} to another node; answers with the task's UPID.",
    reply=TaskAccepted,
)
SNAPSHOT_CREATE = RpcSubject(
    "rpc.container.snapshot_create.{node}",
    CtSnapshotCreate,
    Kind.RPC,
    Scope.NODE,
    "Snapshot a container on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
SNAPSHOT_ROLLBACK = RpcSubject(
    "rpc.container.snapshot_rollback.{node}",
    CtSnapshotRollback,
    Kind.RPC,
    Scope.NODE,
    "Roll a container on {node} back to a snapshot; answers with the task's UPID.",
    reply=TaskAccepted,
)
SNAPSHOT_DELETE = RpcSubject(
    "rpc.container.snapshot_delete.{node}",
    CtSnapshotDelete,
    Kind.RPC,
    Scope.NODE,
    "Delete a container snapshot on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_CLONE = RpcSubject(
    "rpc.container.guest_clone.{node}",
    CtClone,
    Kind.RPC,
    Scope.NODE,
    "Clone a container owned by {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_TEMPLATE = RpcSubject(
    "rpc.container.guest_template.{node}",
    CtTemplate,
    Kind.RPC,
    Scope.NODE,
    "Convert a container on {node} into a template; answers with the task's UPID.",
    reply=TaskAccepted,
)
DISK_RESIZE = RpcSubject(
    "rpc.container.disk_resize.{node}",
    CtDiskResize,
    Kind.RPC,
    Scope.NODE,
    "Grow a container volume on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_STATUS = RpcSubject(
    "rpc.container.guest_status.{node}",
    CtStatusQuery,
    Kind.RPC,
    Scope.NODE,
    "A container's current state and counters, from the agent of {node}.",
    reply=CtStatusReport,
)

GUEST_CREATED = Subject(
    "evt.container.guest_created.{node}",
    CtCreated,
    Kind.EVENT,
    Scope.NODE,
    "A container was created on {node}.",
)
GUEST_STATE_CHANGED = Subject(
    "evt.container.guest_state_changed.{node}",
    CtStateChanged,
    Kind.EVENT,
    Scope.NODE,
    "A container on {node} changed run state.",
)
GUEST_MIGRATED = Subject(
    "evt.container.guest_migrated.{node}",
    CtMigrated,
    Kind.EVENT,
    Scope.NODE,
    "A container left {node} for another node.",
)
GUEST_DESTROYED = Subject(
    "evt.container.guest_destroyed.{node}",
    CtDestroyed,
    Kind.EVENT,
    Scope.NODE,
    "A container was destroyed on {node}.",
)
GUEST_DRIFT_DETECTED = Subject(
    "evt.container.guest_drift_detected.{node}",
    CtDriftDetected,
    Kind.EVENT,
    Scope.NODE,
    "Reconciliation on {node} found a difference between the runtime and the registry.",
)
