"""Vocabulary shared by several bounded contexts: constrained ids, queries, plain replies."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Command, Message, Reply
from rucher.proto.guest import FIRST_VMID, LAST_VMID

# Identifiers, constrained the way Proxmox constrains them (formats from its API schema).
Vmid = Annotated[
    int, msgspec.Meta(ge=FIRST_VMID, le=LAST_VMID, description="A guest's VMID (pve-vmid).")
]
NodeName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$",
        description="A cluster node's name (pve-node); also a valid subject token.",
    ),
]
UserId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[^\s:@!/]{1,64}@[A-Za-z][A-Za-z0-9._-]{0,31}$",
        description="A user, name@realm (pve-userid).",
    ),
]
AuthId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[^\s:@!/]{1,64}@[A-Za-z][A-Za-z0-9._-]{0,31}(![A-Za-z][A-Za-z0-9._-]{0,63})?$",
        description="Who acts: a user (name@realm) or an API token (name@realm!tokenid).",
    ),
]
StorageId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,62}[A-Za-z0-9]$",
        description="A storage's id (pve-storage-id), such as local or ceph.",
    ),
]
VolumeId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,62}[A-Za-z0-9]:\S.{0,254}$",
        description="A volume, STORAGE:VOLNAME (pve-volume-id): local:100/vm-100-disk-0.qcow2.",
    ),
]
SnapshotName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{1,39}$",
        description="A snapshot's name (pve-configid).",
    ),
]
PoolId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9_-]{1,64}$", description="A resource pool's id (pve-poolid)."
    ),
]
ConfigKey = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[a-z][a-z0-9_-]*$",
        description="A Proxmox guest config key, such as memory, net0 or scsi1.",
    ),
]
ByteSize = Annotated[int, msgspec.Meta(ge=0, description="A size in bytes.")]
Seconds = Annotated[float, msgspec.Meta(ge=0, description="A duration in seconds.")]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1, description="A share between 0 and 1.")]
CpuShare = Annotated[
    float,
    msgspec.Meta(ge=0, description="CPU use as a share of the CPUs allotted; may pass 1 briefly."),
]
Digest = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-f]{40}$",
        description="SHA-1 hex digest of a config, for optimistic concurrency as in Proxmox.",
    ),
]


class ChangeKind(StrEnum):
    """What happened to a configuration object."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


class PowerState(StrEnum):
    """A guest's run state, finer than Proxmox's running/stopped (QEMU's ``qmpstatus``)."""

    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    SUSPENDED = "suspended"


class Query(Message, frozen=True, kw_only=True):
    """A read-only request: asking it twice changes nothing, so it carries no command id."""


class GuestCommand(Command, frozen=True, kw_only=True):
    """A command on one guest, run as a task for ``user`` (the UPID's user field)."""

    vmid: Vmid
    user: AuthId


class Done(Reply, frozen=True, kw_only=True, tag="common.done"):
    """The reply to a synchronous command that succeeded and has nothing else to say."""
