"""Storage (Proxmox ``pvesm``): storage definitions, volumes and their content, per node.

Storage definitions are cluster-wide (``rpc.storage.definition_*``, any storage service
instance answers). Volume operations go to the storage service of one node
(``rpc.storage.<name>.{node}``) and answer synchronously: the compute and container agents call
them from inside their own tasks. Uploads, downloads and volume copies run as tasks of their
own. Definitions live in the ``storage`` bucket (one :class:`StorageRecord` per storage id).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Command, Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.common import (
    AuthId,
    ByteSize,
    ChangeKind,
    Digest,
    Done,
    NodeName,
    Query,
    SnapshotName,
    StorageId,
    Vmid,
    VolumeId,
)
from rucher.proto.task import TaskAccepted

VolumeName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="A volume's name within its storage and owner, e.g. vm-100-disk-0.",
    ),
]


class StorageType(StrEnum):
    """The storage backends Rucher implements, by Proxmox's type names."""

    DIR = "dir"
    RBD = "rbd"


class ContentType(StrEnum):
    """What a storage may hold, by Proxmox's content names."""

    IMAGES = "images"
    ROOTDIR = "rootdir"
    ISO = "iso"
    VZTMPL = "vztmpl"
    BACKUP = "backup"
    SNIPPETS = "snippets"


class DiskFormat(StrEnum):
    """Formats a new disk volume may be allocated in."""

    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    SUBVOL = "subvol"


class VolumeProtocol(StrEnum):
    """How a hypervisor reaches a mapped volume."""

    FILE = "file"
    BLOCK = "block"
    RBD = "rbd"


class ChecksumAlgorithm(StrEnum):
    """Checksums Proxmox accepts for uploads and downloads."""

    MD5 = "md5"
    SHA1 = "sha1"
    SHA224 = "sha224"
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"


# Records -------------------------------------------------------------------------------------


class StorageDefinition(msgspec.Struct, frozen=True, kw_only=True):
    """One cluster-wide storage definition (``/storage/{storage}``); ``nodes`` empty = all."""

    storage: StorageId
    storage_type: StorageType
    content: tuple[ContentType, ...]
    nodes: tuple[NodeName, ...] = ()
    shared: bool = False
    disable: bool = False
    path: str | None = None
    pool: str | None = None
    monhost: tuple[str, ...] = ()
    username: str | None = None


class StorageStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One storage as one node sees it (``GET /nodes/{node}/storage``)."""

    storage: StorageId
    storage_type: StorageType
    content: tuple[ContentType, ...]
    shared: bool
    active: bool
    enabled: bool
    total: ByteSize = 0
    used: ByteSize = 0
    avail: ByteSize = 0


class VolumeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One volume of a storage's content; ``vmid`` is its owner, ``parent`` its linked base.

    ``path`` is where the node finds it, as ``pvesm path`` prints it (a file, or an RBD spec
    ``rbd:pool/image:mon_host=...`` without the secret); only a single volume's read has it.
    """

    volid: VolumeId
    content: ContentType
    format: str
    size: ByteSize
    used: ByteSize | None = None
    vmid: Vmid | None = None
    parent: VolumeId | None = None
    protected: bool = False
    notes: str = ""
    ctime: int | None = None
    path: str | None = None


class StorageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The ``storage`` bucket's value: a definition and, for ``rbd``, the cephx secret.

    The secret (Proxmox keeps it in ``/etc/pve/priv/ceph/<storage>.keyring``) never leaves the
    storage service except in a :class:`VolumeMapping` for the hypervisor that needs it.
    """

    definition: StorageDefinition
    keyring: str | None = None


class StorageDefinitionEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A definition with its digest (SHA-1 of its canonical form), for guarded updates."""

    definition: StorageDefinition
    digest: Digest


# Commands ------------------------------------------------------------------------------------


class StorageDefinitionCreate(Command, frozen=True, kw_only=True, tag="storage.definition.create"):
    """Add a storage definition; refused if the id exists.

    ``keyring`` is an ``rbd`` storage's cephx secret (the key, or a keyring file's text).
    """

    definition: StorageDefinition
    user: AuthId | None = None
    keyring: str | None = None


class StorageDefinitionUpdate(Command, frozen=True, kw_only=True, tag="storage.definition.update"):
    """Replace a storage definition if it still has ``digest``; ``keyring`` replaces the secret."""

    definition: StorageDefinition
    digest: Digest | None = None
    user: AuthId | None = None
    keyring: str | None = None


class StorageDefinitionDelete(Command, frozen=True, kw_only=True, tag="storage.definition.delete"):
    """Remove a storage definition; its volumes stay where they are."""

    storage: StorageId
    user: AuthId | None = None


class VolumeAllocate(Command, frozen=True, kw_only=True, tag="storage.volume.allocate"):
    """Allocate a new volume owned by ``vmid``; a name is chosen when ``filename`` is absent."""

    storage: StorageId
    vmid: Vmid
    size: ByteSize
    filename: VolumeName | None = None
    format: DiskFormat | None = None
    content: ContentType = ContentType.IMAGES


class VolumeFree(Command, frozen=True, kw_only=True, tag="storage.volume.free"):
    """Delete a volume; refused while linked clones depend on it or it is protected.

    With ``check_owner`` (the API's ``DELETE .../content/{volume}``) it is also refused while the
    guest owning the volume exists; an agent destroying its own guest leaves it unset.
    """

    volid: VolumeId
    check_owner: bool = False


class VolumeResize(Command, frozen=True, kw_only=True, tag="storage.volume.resize"):
    """Grow a volume to ``size`` bytes; shrinking is refused."""

    volid: VolumeId
    size: ByteSize


class VolumeUpdate(Command, frozen=True, kw_only=True, tag="storage.volume.update"):
    """Change a volume's attributes (``PUT .../content/{volume}``); absent fields stay."""

    volid: VolumeId
    notes: str | None = None
    protected: bool | None = None


class VolumeClone(Command, frozen=True, kw_only=True, tag="storage.volume.clone"):
    """Copy a volume for ``vmid``: linked (copy-on-write from a template) or full."""

    volid: VolumeId
    vmid: Vmid
    linked: bool = False
    snapname: SnapshotName | None = None
    storage: StorageId | None = None
    format: DiskFormat | None = None
    filename: VolumeName | None = None


class VolumeRename(Command, frozen=True, kw_only=True, tag="storage.volume.rename"):
    """Give a volume a new owner (and name), as a clone or restore to another VMID does."""

    volid: VolumeId
    vmid: Vmid
    filename: VolumeName | None = None


class VolumeCreateBase(Command, frozen=True, kw_only=True, tag="storage.volume.create_base"):
    """Turn a guest's volume into a template base (``base-``), the source of linked clones."""

    volid: VolumeId


class VolumeCopy(Command, frozen=True, kw_only=True, tag="storage.volume.copy"):
    """Copy a volume in full for ``vmid`` as a task (``POST .../content/{volume}``)."""

    user: AuthId
    volid: VolumeId
    vmid: Vmid
    storage: StorageId | None = None
    format: DiskFormat | None = None
    filename: VolumeName | None = None
    snapname: SnapshotName | None = None


class VolumeMap(Command, frozen=True, kw_only=True, tag="storage.volume.map"):
    """Make a volume usable by this node's hypervisor (activate it, map an RBD device)."""

    volid: VolumeId


class VolumeUnmap(Command, frozen=True, kw_only=True, tag="storage.volume.unmap"):
    """Undo :class:`VolumeMap` on this node."""

    volid: VolumeId


class VolumeSnapshotCreate(Command, frozen=True, kw_only=True, tag="storage.snapshot.create"):
    """Snapshot one volume (a qcow2 internal snapshot, an RBD snapshot)."""

    volid: VolumeId
    snapname: SnapshotName


class VolumeSnapshotRollback(Command, frozen=True, kw_only=True, tag="storage.snapshot.rollback"):
    """Roll one volume back to a snapshot."""

    volid: VolumeId
    snapname: SnapshotName


class VolumeSnapshotDelete(Command, frozen=True, kw_only=True, tag="storage.snapshot.delete"):
    """Delete one volume snapshot; refused while linked clones depend on it."""

    volid: VolumeId
    snapname: SnapshotName


class ContentDownload(Command, frozen=True, kw_only=True, tag="storage.content.download"):
    """Download an ISO or template from ``url`` into a storage (``download-url``), as a task."""

    user: AuthId
    storage: StorageId
    url: str
    filename: VolumeName
    content: ContentType
    checksum: str | None = None
    checksum_algorithm: ChecksumAlgorithm | None = None
    verify_certificates: bool = True


class ContentUpload(Command, frozen=True, kw_only=True, tag="storage.content.upload"):
    """Move an upload from the ``uploads`` object store into a storage, as a task.

    The object's SHA-256 digest is always checked; ``checksum`` adds the uploader's own.
    """

    user: AuthId
    storage: StorageId
    object: str
    filename: VolumeName
    content: ContentType
    checksum: str | None = None
    checksum_algorithm: ChecksumAlgorithm | None = None


# Queries and replies -------------------------------------------------------------------------


class StorageDefinitionListQuery(Query, frozen=True, kw_only=True, tag="storage.definition.list"):
    """List the cluster's storage definitions (``GET /storage``), optionally one or one type."""

    storage: StorageId | None = None
    storage_type: StorageType | None = None


class StorageDefinitionListing(Reply, frozen=True, kw_only=True, tag="storage.definition.listing"):
    """Storage definitions with their digests, by id."""

    definitions: tuple[StorageDefinitionEntry, ...] = ()


class StorageStatusQuery(Query, frozen=True, kw_only=True, tag="storage.status"):
    """Ask a node's storage service for its storages' status, optionally filtered."""

    storage: StorageId | None = None
    content: ContentType | None = None
    enabled_only: bool = False


class StorageStatusReport(Reply, frozen=True, kw_only=True, tag="storage.status_report"):
    """Every matching storage as the node sees it."""

    storages: tuple[StorageStatus, ...] = ()


class ContentListQuery(Query, frozen=True, kw_only=True, tag="storage.content.list"):
    """List a storage's content on a node, filtered by content type and owner."""

    storage: StorageId
    content: ContentType | None = None
    vmid: Vmid | None = None


class ContentListing(Reply, frozen=True, kw_only=True, tag="storage.content.listing"):
    """A storage's volumes."""

    volumes: tuple[VolumeInfo, ...] = ()


class VolumeInfoQuery(Query, frozen=True, kw_only=True, tag="storage.volume.info"):
    """One volume's attributes (``GET .../content/{volume}``)."""

    volid: VolumeId


class OrphanQuery(Query, frozen=True, kw_only=True, tag="storage.orphans"):
    """Find volumes whose owner guest does not exist (one storage, or all the node sees)."""

    storage: StorageId | None = None


class OrphanReport(Reply, frozen=True, kw_only=True, tag="storage.orphan_report"):
    """Volumes without an owner; each is also published as ``volume_orphan_found``."""

    volumes: tuple[VolumeInfo, ...] = ()


class VolumeDetails(Reply, frozen=True, kw_only=True, tag="storage.volume.details"):
    """A volume as it is after the command."""

    volume: VolumeInfo


class VolumeMapping(Reply, frozen=True, kw_only=True, tag="storage.volume.mapping"):
    """Where the hypervisor finds a mapped volume, and its libvirt and LXD disk definitions.

    ``libvirt_disk`` is a whole ``<disk>`` element without ``<target>`` (the agent adds it).
    For ``rbd``, ``username`` and ``secret`` are the cephx identity the hypervisor defines as a
    libvirt secret whose usage is ``secret_usage``; they travel only in this reply.
    """

    volid: VolumeId
    protocol: VolumeProtocol
    path: str
    format: DiskFormat
    libvirt_source: str
    lxd_device: dict[str, str] = {}
    libvirt_disk: str = ""
    username: str | None = None
    secret: str | None = None
    secret_usage: str | None = None


# Events --------------------------------------------------------------------------------------


class StorageDefinitionChanged(Event, frozen=True, kw_only=True, tag="storage.definition.changed"):
    """A storage definition was created, updated or deleted."""

    storage: StorageId
    change: ChangeKind
    actor: AuthId | None = None


class VolumeAllocated(Event, frozen=True, kw_only=True, tag="storage.volume.allocated"):
    """A volume was created (allocated, cloned from ``source``, or downloaded)."""

    volid: VolumeId
    size: ByteSize
    vmid: Vmid | None = None
    source: VolumeId | None = None


class VolumeFreed(Event, frozen=True, kw_only=True, tag="storage.volume.freed"):
    """A volume was deleted."""

    volid: VolumeId
    vmid: Vmid | None = None


class VolumeResized(Event, frozen=True, kw_only=True, tag="storage.volume.resized"):
    """A volume grew to ``size`` bytes."""

    volid: VolumeId
    size: ByteSize


class VolumeRenamed(Event, frozen=True, kw_only=True, tag="storage.volume.renamed"):
    """A volume got a new name and owner."""

    volid: VolumeId
    new_volid: VolumeId
    vmid: Vmid


class VolumeOrphanFound(Event, frozen=True, kw_only=True, tag="storage.volume.orphan_found"):
    """A volume whose owner does not exist was found; it is reported, never deleted."""

    volid: VolumeId
    vmid: Vmid | None = None
    detail: str = ""


class StorageStatusPublished(Event, frozen=True, kw_only=True, tag="storage.status.published"):
    """A node's storages and their usage, for the scheduler and ``/cluster/resources``."""

    storages: tuple[StorageStatus, ...]


# Subjects ------------------------------------------------------------------------------------

DEFINITION_CREATE = RpcSubject(
    "rpc.storage.definition_create",
    StorageDefinitionCreate,
    Kind.RPC,
    Scope.CLUSTER,
    "Add a cluster-wide storage definition.",
    reply=Done,
)
DEFINITION_UPDATE = RpcSubject(
    "rpc.storage.definition_update",
    StorageDefinitionUpdate,
    Kind.RPC,
    Scope.CLUSTER,
    "Replace a storage definition, guarded by its digest.",
    reply=Done,
)
DEFINITION_DELETE = RpcSubject(
    "rpc.storage.definition_delete",
    StorageDefinitionDelete,
    Kind.RPC,
    Scope.CLUSTER,
    "Remove a storage definition.",
    reply=Done,
)
DEFINITION_LIST = RpcSubject(
    "rpc.storage.definition_list",
    StorageDefinitionListQuery,
    Kind.RPC,
    Scope.CLUSTER,
    "The cluster's storage definitions with their digests.",
    reply=StorageDefinitionListing,
)
STATUS = RpcSubject(
    "rpc.storage.status.{node}",
    StorageStatusQuery,
    Kind.RPC,
    Scope.NODE,
    "The status of the storages {node} sees.",
    reply=StorageStatusReport,
)
CONTENT_LIST = RpcSubject(
    "rpc.storage.content_list.{node}",
    ContentListQuery,
    Kind.RPC,
    Scope.NODE,
    "The volumes of a storage, as seen from {node}.",
    reply=ContentListing,
)
CONTENT_DOWNLOAD = RpcSubject(
    "rpc.storage.content_download.{node}",
    ContentDownload,
    Kind.RPC,
    Scope.NODE,
    "Download an ISO or template on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
CONTENT_UPLOAD = RpcSubject(
    "rpc.storage.content_upload.{node}",
    ContentUpload,
    Kind.RPC,
    Scope.NODE,
    "Store an object of the uploads store in a storage of {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
ORPHANS = RpcSubject(
    "rpc.storage.orphans.{node}",
    OrphanQuery,
    Kind.RPC,
    Scope.NODE,
    "Volumes seen from {node} whose owner guest does not exist (reported, never deleted).",
    reply=OrphanReport,
)
VOLUME_INFO = RpcSubject(
    "rpc.storage.volume_info.{node}",
    VolumeInfoQuery,
    Kind.RPC,
    Scope.NODE,
    "One volume's attributes, as seen from {node}.",
    reply=VolumeDetails,
)
VOLUME_CREATE_BASE = RpcSubject(
    "rpc.storage.volume_create_base.{node}",
    VolumeCreateBase,
    Kind.RPC,
    Scope.NODE,
    "Turn a volume into a template base through the storage service of {node}.",
    reply=VolumeDetails,
)
VOLUME_COPY = RpcSubject(
    "rpc.storage.volume_copy.{node}",
    VolumeCopy,
    Kind.RPC,
    Scope.NODE,
    "Copy a volume in full on {node}; answers with the task's UPID.",
    reply=TaskAccepted,
)
VOLUME_ALLOCATE = RpcSubject(
    "rpc.storage.volume_allocate.{node}",
    VolumeAllocate,
    Kind.RPC,
    Scope.NODE,
    "Allocate a volume on a storage reachable from {node}.",
    reply=VolumeDetails,
)
VOLUME_FREE = RpcSubject(
    "rpc.storage.volume_free.{node}",
    VolumeFree,
    Kind.RPC,
    Scope.NODE,
    "Delete a volume through the storage service of {node}.",
    reply=Done,
)
VOLUME_RESIZE = RpcSubject(
    "rpc.storage.volume_resize.{node}",
    VolumeResize,
    Kind.RPC,
    Scope.NODE,
    "Grow a volume through the storage service of {node}.",
    reply=VolumeDetails,
)
VOLUME_UPDATE = RpcSubject(
    "rpc.storage.volume_update.{node}",
    VolumeUpdate,
    Kind.RPC,
    Scope.NODE,
    "Change a volume's notes or protection through the storage service of {node}.",
    reply=VolumeDetails,
)
VOLUME_CLONE = RpcSubject(
    "rpc.storage.volume_clone.{node}",
    VolumeClone,
    Kind.RPC,
    Scope.NODE,
    "Clone a volume, linked or full, through the storage service of {node}.",
    reply=VolumeDetails,
)
VOLUME_RENAME = RpcSubject(
    "rpc.storage.volume_rename.{node}",
    VolumeRename,
    Kind.RPC,
    Scope.NODE,
    "Give a volume a new owner through the storage service of {node}.",
    reply=VolumeDetails,
)
VOLUME_MAP = RpcSubject(
    "rpc.storage.volume_map.{node}",
    VolumeMap,
    Kind.RPC,
    Scope.NODE,
    "Make a volume usable by the hypervisor of {node}.",
    reply=VolumeMapping,
)
VOLUME_UNMAP = RpcSubject(
    "rpc.storage.volume_unmap.{node}",
    VolumeUnmap,
    Kind.RPC,
    Scope.NODE,
    "Release a volume mapping on {node}.",
    reply=Done,
)
SNAPSHOT_CREATE = RpcSubject(
    "rpc.storage.snapshot_create.{node}",
    VolumeSnapshotCreate,
    Kind.RPC,
    Scope.NODE,
    "Snapshot a volume through the storage service of {node}.",
    reply=Done,
)
SNAPSHOT_ROLLBACK = RpcSubject(
    "rpc.storage.snapshot_rollback.{node}",
    VolumeSnapshotRollback,
    Kind.RPC,
    Scope.NODE,
    "Roll a volume back to a snapshot through the storage service of {node}.",
    reply=Done,
)
SNAPSHOT_DELETE = RpcSubject(
    "rpc.storage.snapshot_delete.{node}",
    VolumeSnapshotDelete,
    Kind.RPC,
    Scope.NODE,
    "Delete a volume snapshot through the storage service of {node}.",
    reply=Done,
)

DEFINITION_CHANGED = Subject(
    "evt.storage.definition_changed.{node}",
    StorageDefinitionChanged,
    Kind.EVENT,
    Scope.NODE,
    "A storage definition changed (published by the instance on {node} that changed it).",
)
VOLUME_ALLOCATED = Subject(
    "evt.storage.volume_allocated.{node}",
    VolumeAllocated,
    Kind.EVENT,
    Scope.NODE,
    "A volume was created by the storage service of {node}.",
)
VOLUME_FREED = Subject(
    "evt.storage.volume_freed.{node}",
    VolumeFreed,
    Kind.EVENT,
    Scope.NODE,
    "A volume was deleted by the storage service of {node}.",
)
VOLUME_RESIZED = Subject(
    "evt.storage.volume_resized.{node}",
    VolumeResized,
    Kind.EVENT,
    Scope.NODE,
    "A volume was grown by the storage service of {node}.",
)
VOLUME_RENAMED = Subject(
    "evt.storage.volume_renamed.{node}",
    VolumeRenamed,
    Kind.EVENT,
    Scope.NODE,
    "A volume changed owner through the storage service of {node}.",
)
VOLUME_ORPHAN_FOUND = Subject(
    "evt.storage.volume_orphan_found.{node}",
    VolumeOrphanFound,
    Kind.EVENT,
    Scope.NODE,
    "The storage service of {node} found a volume without an owner.",
)
STATUS_PUBLISHED = Subject(
    "evt.storage.status_published.{node}",
    StorageStatusPublished,
    Kind.EVENT,
    Scope.NODE,
    "The storages {node} sees, with their usage.",
)
