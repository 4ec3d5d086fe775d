"""Virtual machines (Proxmox ``qm``): lifecycle commands to a node's compute agent, and its events.

Every command is a request to the agent of the node that owns the guest
(``rpc.compute.<name>.{node}``); the agent checks it, starts a task and answers with the task's
UPID at once (:class:`~rucher.proto.task.TaskAccepted`), or with an error reply. Field names follow
the Proxmox API parameters, in snake_case (``force-cpu`` is ``force_cpu``). A guest's config is
carried as Proxmox config keys and property strings (``net0`` = ``virtio,bridge=vmbr0``), parsed
by the shared library, so the contract does not change when Rucher learns a new option.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.bus import SessionSubjects
from rucher.proto.common import (
    ByteSize,
    ConfigKey,
    CpuShare,
    Digest,
    Done,
    GuestCommand,
    NodeName,
    PoolId,
    PowerState,
    Query,
    Seconds,
    SnapshotName,
    StorageId,
    Vmid,
)
from rucher.proto.guest import GuestLock
from rucher.proto.task import TaskAccepted

Timeout = Annotated[int, msgspec.Meta(ge=0, description="Seconds to wait at most.")]
BandwidthLimit = Annotated[int, msgspec.Meta(ge=0, description="I/O limit in KiB/s; 0 = none.")]
DiskKey = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(ide[0-3]|scsi([0-9]|[12][0-9]|30)|virtio([0-9]|1[0-5])|sata[0-5]|efidisk0|tpmstate0)$",
        description="A VM disk's config key, such as scsi0 or virtio1.",
    ),
]


class CloneFormat(StrEnum):
    """Target formats for a full clone on file storage."""

    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"


class RrdTimeframe(StrEnum):
    """The time spans Proxmox's ``rrddata`` offers."""

    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class RrdConsolidation(StrEnum):
    """How samples are consolidated over a time step."""

    AVERAGE = "AVERAGE"
    MAX = "MAX"


class DriftKind(StrEnum):
    """What reconciliation found between libvirt and the guest registry."""

    UNKNOWN_DOMAIN = "unknown_domain"
    MISSING_DOMAIN = "missing_domain"
    STATE_MISMATCH = "state_mismatch"
    ORPHAN_DISK = "orphan_disk"
    ADOPTED = "adopted"


# Commands ------------------------------------------------------------------------------------


class VmCreate(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.create"):
    """Create a VM from Proxmox config keys; ``STORAGE:SIZE`` disk values allocate new disks.

    With ``claim_id`` (and its ``claim_token``) the scheduler reserved this node for the VM: the
    agent confirms the claim once the VM is defined and releases it when the create fails.
    """

    config: dict[ConfigKey, str]
    start: bool = False
    pool: PoolId | None = None
    claim_id: str | None = None
    claim_token: int = 0


class VmStart(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.start"):
    """Start a VM; the agent refuses an ``owner_token`` older than the guest registry's."""

    timeout: Timeout | None = None
    skiplock: bool = False
    machine: str | None = None
    force_cpu: str | None = None
    migratedfrom: NodeName | None = None
    owner_token: int = 0
    claim_id: str | None = None
    # HA starts: the name of the lease whose fencing token this start acts under (the target
    # node's ``ha-node:{node}``) and that token; the agent refuses the start unless the lease
    # holds that token now, so a start issued before a fence can never run after it.
    fence_lease: str | None = None
    fence_epoch: Annotated[int, msgspec.Meta(ge=1)] | None = None


class VmStop(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.stop"):
    """Stop a VM at once, like pulling the plug."""

    timeout: Timeout | None = None
    skiplock: bool = False
    keep_active: bool = False
    overrule_shutdown: bool = False


class VmShutdown(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.shutdown"):
    """Ask a VM to power off (ACPI); with ``force_stop``, stop it when ``timeout`` passes."""

    timeout: Timeout | None = None
    force_stop: bool = False
    keep_active: bool = False
    skiplock: bool = False


class VmReboot(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.reboot"):
    """Shut a VM down and start it again, applying pending changes."""

    timeout: Timeout | None = None


class VmReset(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.reset"):
    """Reset a VM's virtual hardware, like pressing its reset button."""

    skiplock: bool = False


class VmSuspend(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.suspend"):
    """Pause a VM; with ``todisk``, hibernate it to a state volume and stop it."""

    todisk: bool = False
    statestorage: StorageId | None = None
    skiplock: bool = False


class VmResume(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.resume"):
    """Resume a paused VM; ``owner_token`` as for start."""

    skiplock: bool = False
    nocheck: bool = False
    owner_token: int = 0


class VmDestroy(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.destroy"):
    """Destroy a stopped VM and its disks, and free its VMID."""

    purge: bool = False
    destroy_unreferenced_disks: bool = False
    skiplock: bool = False


class VmConfigUpdate(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.config_update"):
    """Change a VM's config: set keys, delete keys, revert pending changes; guarded by digest."""

    config: dict[ConfigKey, str] = {}
    delete: tuple[ConfigKey, ...] = ()
    revert: tuple[ConfigKey, ...] = ()
    digest: Digest | None = None
    force: bool = False
    skiplock: bool = False


class VmMigrate(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.migrate"):
    """Move a VM to ``target``, live when ``online``, copying local disks when asked.

    With ``claim_id`` (and its ``claim_token``) the scheduler reserved room on ``target``: the
    target confirms the claim once the VM is its own, and releases it if the migration fails.
    """

    target: NodeName
    online: bool = False
    with_local_disks: bool = False
    targetstorage: str | None = None
    bwlimit: BandwidthLimit | None = None
    force: bool = False
    claim_id: str | None = None
    tunnelled: bool = False
    claim_token: int = 0


class VmSnapshotCreate(GuestCommand, frozen=True, kw_only=True, tag="compute.snapshot.create"):
    """Snapshot a VM's disks, and its RAM too with ``vmstate``."""

    snapname: SnapshotName
    description: str = ""
    vmstate: bool = False


class VmSnapshotRollback(GuestCommand, frozen=True, kw_only=True, tag="compute.snapshot.rollback"):
    """Roll a VM back to a snapshot, then start it if ``start``."""

    snapname: SnapshotName
    start: bool = False


class VmSnapshotDelete(GuestCommand, frozen=True, kw_only=True, tag="compute.snapshot.delete"):
    """Delete a VM snapshot; ``force`` drops it from the config even if a disk refuses."""

    snapname: SnapshotName
    force: bool = False


class VmSnapshotUpdate(GuestCommand, frozen=True, kw_only=True, tag="compute.snapshot.update"):
    """Change a snapshot's description (``PUT .../snapshot/{snapname}/config``)."""

    snapname: SnapshotName
    description: str = ""


class VmClone(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.clone"):
    """Clone a VM (or a template, linked unless ``full``) into ``newid``."""

    newid: Vmid
    full: bool | None = None
    target: NodeName | None = None
    storage: StorageId | None = None
    format: CloneFormat | None = None
    name: str | None = None
    description: str | None = None
    pool: PoolId | None = None
    snapname: SnapshotName | None = None
    bwlimit: BandwidthLimit | None = None
    claim_id: str | None = None


class VmTemplate(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.template"):
    """Turn a stopped VM into a template (its disks become read-only base images)."""

    disk: DiskKey | None = None


class VmDiskResize(GuestCommand, frozen=True, kw_only=True, tag="compute.disk.resize"):
    """Grow a VM disk to ``size`` bytes, or by ``size`` when ``relative``; never shrink."""

    disk: DiskKey
    size: ByteSize
    relative: bool = False
    digest: Digest | None = None
    skiplock: bool = False


# Queries and their replies -------------------------------------------------------------------


class VmStatusQuery(Query, frozen=True, kw_only=True, tag="compute.guest.status"):
    """Ask the owning agent for a VM's current state and counters (``status/current``)."""

    vmid: Vmid


class VmStatusReport(Reply, frozen=True, kw_only=True, tag="compute.guest.status_report"):
    """A VM's current state and counters, as ``GET .../status/current`` reports them."""

    vmid: Vmid
    status: PowerState
    name: str = ""
    uptime: Seconds = 0.0
    cpu: CpuShare = 0.0
    cpus: int = 0
    mem: ByteSize = 0
    maxmem: ByteSize = 0
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
    running_machine: str | None = None
    running_qemu: str | None = None


class VmRrdQuery(Query, frozen=True, kw_only=True, tag="compute.guest.rrddata"):
    """Ask the owning agent for a VM's time series (``rrddata``)."""

    vmid: Vmid
    timeframe: RrdTimeframe
    cf: RrdConsolidation = RrdConsolidation.AVERAGE


class RrdPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a guest's time series; ``None`` where no sample exists."""

    time: int
    cpu: float | None = None
    maxcpu: float | None = None
    mem: float | None = None
    maxmem: float | None = None
    disk: float | None = None
    maxdisk: float | None = None
    diskread: float | None = None
    diskwrite: float | None = None
    netin: float | None = None
    netout: float | None = None


class VmRrdSeries(Reply, frozen=True, kw_only=True, tag="compute.guest.rrddata_series"):
    """A VM's time series, oldest first."""

    vmid: Vmid
    points: tuple[RrdPoint, ...] = ()


# Events --------------------------------------------------------------------------------------


class VmCreated(Event, frozen=True, kw_only=True, tag="compute.guest.created"):
    """A VM was defined on its node with its disks."""

    vmid: Vmid
    name: str = ""
    upid: str | None = None


class VmStateChanged(Event, frozen=True, kw_only=True, tag="compute.guest.state_changed"):
    """A VM's run state changed, by a command or on its own (crash, guest power-off)."""

    vmid: Vmid
    state: PowerState
    previous: PowerState | None = None
    reason: str = ""
    upid: str | None = None


class VmMigrated(Event, frozen=True, kw_only=True, tag="compute.guest.migrated"):
    """A VM moved from this node to ``target``, which owns it now."""

    vmid: Vmid
    target: NodeName
    online: bool
    downtime: Seconds | None = None
    upid: str | None = None


class VmDestroyed(Event, frozen=True, kw_only=True, tag="compute.guest.destroyed"):
    """A VM and its disks were removed from its node."""

    vmid: Vmid
    upid: str | None = None


class VmDriftDetected(Event, frozen=True, kw_only=True, tag="compute.guest.drift_detected"):
    """Reconciliation found libvirt and the guest registry disagreeing, and what it did."""

    kind: DriftKind
    vmid: Vmid | None = None
    domain: str | None = None
    detail: str = ""


# Subjects ------------------------------------------------------------------------------------


GUEST_CREATE = RpcSubject(
    "rpc.compute.guest_create.{node}",
    VmCreate,
    Kind.RPC,
    Scope.NODE,
    "Create a VM on {node}; answers with the create task's UPID.",
    reply=TaskAccepted,
)
GUEST_START = RpcSubject(
    "rpc.compute.guest_start.{node}",
    VmStart,
    Kind.RPC,
    Scope.NODE,
    "Start a VM on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_STOP = RpcSubject(
    "rpc.compute.guest_stop.{node}",
    VmStop,
    Kind.RPC,
    Scope.NODE,
    "Stop a VM on {node} at once; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_SHUTDOWN = RpcSubject(
    "rpc.compute.guest_shutdown.{node}",
    VmShutdown,
    Kind.RPC,
    Scope.NODE,
    "Shut a VM on {node} down gracefully; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_REBOOT = RpcSubject(
    "rpc.compute.guest_reboot.{node}",
    VmReboot,
    Kind.RPC,
    Scope.NODE,
    "Reboot a VM on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_RESET = RpcSubject(
    "rpc.compute.guest_reset.{node}",
    VmReset,
    Kind.RPC,
    Scope.NODE,
    "Reset a VM on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_SUSPEND = RpcSubject(
    "rpc.compute.guest_suspend.{node}",
    VmSuspend,
    Kind.RPC,
    Scope.NODE,
    "Pause or hibernate a VM on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_RESUME = RpcSubject(
    "rpc.compute.guest_resume.{node}",
    VmResume,
    Kind.RPC,
    Scope.NODE,
    "Resume a paused VM on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_DESTROY = RpcSubject(
    "rpc.compute.guest_destroy.{node}",
    VmDestroy,
    Kind.RPC,
    Scope.NODE,
    "Destroy a VM on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_CONFIG_UPDATE = RpcSubject(
    "rpc.compute.guest_config_update.{node}",
    VmConfigUpdate,
    Kind.RPC,
    Scope.NODE,
    "Change a VM's config on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_MIGRATE = RpcSubject(
    "rpc.compute.guest_migrate.{node}",
    VmMigrate,
    Kind.RPC,
    Scope.NODE,
    "Migrate a VM from {node} to another node; answers with the task's UPID.",
    reply=TaskAccepted,
)
SNAPSHOT_CREATE = RpcSubject(
    "rpc.compute.snapshot_create.{node}",
    VmSnapshotCreate,
    Kind.RPC,
    Scope.NODE,
    "Snapshot a VM on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
SNAPSHOT_ROLLBACK = RpcSubject(
    "rpc.compute.snapshot_rollback.{node}",
    VmSnapshotRollback,
    Kind.RPC,
    Scope.NODE,
    "Roll a VM on {node} back to a snapshot; answers with the task's UPID.",
    reply=TaskAccepted,
)
SNAPSHOT_DELETE = RpcSubject(
    "rpc.compute.snapshot_delete.{node}",
    VmSnapshotDelete,
    Kind.RPC,
    Scope.NODE,
    "Delete a VM snapshot on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
SNAPSHOT_UPDATE = RpcSubject(
    "rpc.compute.snapshot_update.{node}",
    VmSnapshotUpdate,
    Kind.RPC,
    Scope.NODE,
    "Change a VM snapshot's description on {node}; answers once it is written.",
    reply=Done,
)
GUEST_CLONE = RpcSubject(
    "rpc.compute.guest_clone.{node}",
    VmClone,
    Kind.RPC,
    Scope.NODE,
    "Clone a VM owned by {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_TEMPLATE = RpcSubject(
    "rpc.compute.guest_template.{node}",
    VmTemplate,
    Kind.RPC,
    Scope.NODE,
    "Convert a VM on {node} into a template; answers with the task's UPID.",
    reply=TaskAccepted,
)
DISK_RESIZE = RpcSubject(
    "rpc.compute.disk_resize.{node}",
    VmDiskResize,
    Kind.RPC,
    Scope.NODE,
    "Grow a VM disk on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
GUEST_STATUS = RpcSubject(
    "rpc.compute.guest_status.{node}",
    VmStatusQuery,
    Kind.RPC,
    Scope.NODE,
    "A VM's current state and counters, from the agent of {node}.",
    reply=VmStatusReport,
)
GUEST_RRDDATA = RpcSubject(
    "rpc.compute.guest_rrddata.{node}",
    VmRrdQuery,
    Kind.RPC,
    Scope.NODE,
    "A VM's cpu/memory/io time series, kept by the agent of {node}.",
    reply=VmRrdSeries,
)

GUEST_CREATED = Subject(
    "evt.compute.guest_created.{node}",
    VmCreated,
    Kind.EVENT,
    Scope.NODE,
    "A VM was created on {node}.",
)
GUEST_STATE_CHANGED = Subject(
    "evt.compute.guest_state_changed.{node}",
    VmStateChanged,
    Kind.EVENT,
    Scope.NODE,
    "A VM on {node} changed run state.",
)
GUEST_MIGRATED = Subject(
    "evt.compute.guest_migrated.{node}",
    VmMigrated,
    Kind.EVENT,
    Scope.NODE,
    "A VM left {node} for another node.",
)
GUEST_DESTROYED = Subject(
    "evt.compute.guest_destroyed.{node}",
    VmDestroyed,
    Kind.EVENT,
    Scope.NODE,
    "A VM was destroyed on {node}.",
)
GUEST_DRIFT_DETECTED = Subject(
    "evt.compute.guest_drift_detected.{node}",
    VmDriftDetected,
    Kind.EVENT,
    Scope.NODE,
    "Reconciliation on {node} found a difference between libvirt and the registry.",
)


# Serial console sessions ---------------------------------------------------------------------

ConsoleSessionId = Annotated[
    str,
    msgspec.Meta(pattern=r"^[0-9a-f]{32}$", description="A console session's id (32 hex digits)."),
]
SerialKey = Annotated[
    str, msgspec.Meta(pattern=r"^serial[0-3]$", description="The serial port, such as serial0.")
]


class VmConsoleOpen(Query, frozen=True, kw_only=True, tag="compute.console.open"):
    """Open a running VM's serial console for ``user``: a ``vncproxy`` task relays it.

    The caller picks ``session`` and subscribes to its ``.out`` subject before asking, so no
    byte is lost; the agent then relays the console on ``CONSOLE_OUT``/``CONSOLE_IN``.
    """

    vmid: Vmid
    user: str
    session: ConsoleSessionId
    serial: SerialKey = "serial0"


class ConsoleOpened(Reply, frozen=True, kw_only=True, tag="compute.console.opened"):
    """The console session is open; ``upid`` is its task, which ends when the session does."""

    vmid: Vmid
    session: ConsoleSessionId
    upid: str


CONSOLE_OPEN = RpcSubject(
    "rpc.compute.console_open.{node}",
    VmConsoleOpen,
    Kind.RPC,
    Scope.NODE,
    "Open a VM's serial console on {node}; bytes then flow on console_data subjects.",
    reply=ConsoleOpened,
)
CONSOLE_DATA = SessionSubjects(
    "rpc.compute.console_data",
    "A console session's bytes on core NATS: .out from the agent of {node}, .in to it.",
)


# Migration between nodes ---------------------------------------------------------------------


class LocalDisk(msgspec.Struct, frozen=True, kw_only=True):
    """A disk only its node reaches (``GET .../migrate``'s ``local_disks``)."""

    volid: str
    size: ByteSize = 0
    cdrom: bool = False
    is_unused: bool = False


class VmMigrateCheck(Query, frozen=True, kw_only=True, tag="compute.guest.migrate_check"):
    """Whether a VM could migrate, and where to (Proxmox's migration preconditions)."""

    vmid: Vmid
    target: NodeName | None = None


class VmMigrateCheckReport(
    Reply, frozen=True, kw_only=True, tag="compute.guest.migrate_check_report"
):
    """The preconditions: run state, nodes with a compute agent, local disks and devices.

    ``not_allowed_nodes`` maps a node to why it cannot take the VM now, and
    ``unavailable_storages`` to the storages of the VM's disks it lacks.
    """

    vmid: Vmid
    running: bool
    allowed_nodes: tuple[NodeName, ...] = ()
    not_allowed_nodes: dict[NodeName, str] = {}
    local_disks: tuple[LocalDisk, ...] = ()
    local_resources: tuple[str, ...] = ()
    unavailable_storages: dict[NodeName, tuple[StorageId, ...]] = {}


class DiskCopy(msgspec.Struct, frozen=True, kw_only=True):
    """A local disk a live migration copies: the target allocates its twin on ``storage``."""

    key: DiskKey
    volid: str
    size: ByteSize
    format: str
    storage: StorageId


class VmMigratePrepare(
    GuestCommand, frozen=True, kw_only=True, tag="compute.guest.migrate_prepare"
):
    """Source to target: check that the VM of ``source`` fits here and render its domain here.

    ``copy_disks`` are local disks the live migration copies; the target allocates each anew.
    """

    source: NodeName
    online: bool = False
    copy_disks: tuple[DiskCopy, ...] = ()


class VmMigrateReady(Reply, frozen=True, kw_only=True, tag="compute.guest.migrate_ready"):
    """The target's domain XML, and where its libvirtd and QEMU take a live migration."""

    domain_xml: str
    peer_uri: str = ""
    migrate_uri: str = ""
    volumes: dict[DiskKey, str] = {}


class VmMigrateFinish(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.migrate_finish"):
    """Source to target, once the target owns the VM: define it here and publish its state."""

    source: NodeName
    online: bool = False
    claim_id: str | None = None
    claim_token: int = 0


class VmMigrateAbort(GuestCommand, frozen=True, kw_only=True, tag="compute.guest.migrate_abort"):
    """Source to target: the migration failed; free the disks prepared for it (and its claim)."""

    source: NodeName
    claim_id: str | None = None


class VmDomainProbe(Query, frozen=True, kw_only=True, tag="compute.guest.domain_probe"):
    """Whether a node's hypervisor has a VM's domain, whichever node owns the VM.

    A restarted source agent asks its peers where a migration it drove, and that libvirt
    finished while the agent was down, left the guest.
    """

    vmid: Vmid


class VmDomainPresence(Reply, frozen=True, kw_only=True, tag="compute.guest.domain_presence"):
    """The node's domain of the VM: its run state, or None when it has none."""

    vmid: Vmid
    state: PowerState | None = None


GUEST_MIGRATE_CHECK = RpcSubject(
    "rpc.compute.guest_migrate_check.{node}",
    VmMigrateCheck,
    Kind.RPC,
    Scope.NODE,
    "Migration preconditions of a VM on {node}.",
    reply=VmMigrateCheckReport,
)
GUEST_MIGRATE_PREPARE = RpcSubject(
    "rpc.compute.guest_migrate_prepare.{node}",
    VmMigratePrepare,
    Kind.RPC,
    Scope.NODE,
    "Ask {node}, a migration's target, to check and render the incoming VM's domain.",
    reply=VmMigrateReady,
)
GUEST_MIGRATE_FINISH = RpcSubject(
    "rpc.compute.guest_migrate_finish.{node}",
    VmMigrateFinish,
    Kind.RPC,
    Scope.NODE,
    "Tell {node}, a migration's target that now owns the VM, to define it and publish its state.",
    reply=Done,
)
GUEST_DOMAIN_PROBE = RpcSubject(
    "rpc.compute.guest_domain_probe.{node}",
    VmDomainProbe,
    Kind.RPC,
    Scope.NODE,
    "Whether {node}'s hypervisor has a VM's domain (and its state), whoever owns the VM.",
    reply=VmDomainPresence,
)
GUEST_MIGRATE_ABORT = RpcSubject(
    "rpc.compute.guest_migrate_abort.{node}",
    VmMigrateAbort,
    Kind.RPC,
    Scope.NODE,
    "Tell {node}, a failed migration's target, to free the disks it allocated for the VM.",
    reply=Done,
)
