"""A guest's disks as storage volumes: which to allocate, which to map, which the guest owns."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from rucher.compute.cloudinit import CLOUDINIT_VOLUME
from rucher.compute.domain_xml import DISK_KEY
from rucher.proto.storage import DiskFormat, VolumeInfo, VolumeMapping

# ``STORAGE:SIZE`` (GiB, fractions allowed) asks for a new disk; ``STORAGE:VOLNAME`` names one.
NEW_DISK = re.compile(r"^(?P<storage>[A-Za-z][A-Za-z0-9._-]*):(?P<size>\d+(\.\d+)?)$")
VOLUME_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*:.+$")
UNUSED_KEY = re.compile(r"^unused\d+$")
# The owner is in the last ``vm-<vmid>-``/``base-<vmid>-`` of the name: a linked clone's
# ``local:150/base-150-disk-0.qcow2/151/vm-151-disk-0.qcow2`` belongs to 151.
OWNER = re.compile(r"(?:^|/|:)(?:vm|base)-(\d+)-")
GIB = 1 << 30
# Folders of a ``dir`` storage whose files are never a guest's disk, whatever their names.
NOT_DISKS = frozenset({"iso", "vztmpl", "backup", "snippets", "import"})


class VolumeStore(Protocol):
    """This node's storage service (``rpc.storage.volume_*.{node}``), as the agent uses it."""

    async def allocate(
        self, storage: str, vmid: int, size: int, fmt: DiskFormat | None
    ) -> VolumeInfo:
        """A new disk volume of ``size`` bytes owned by ``vmid``, named by the storage.

        Without ``fmt`` the storage picks its default (``raw`` on ``dir``, as Proxmox does).
        """

    async def free(self, volid: str) -> None:
        """Delete a volume."""

    async def map(self, volid: str) -> VolumeMapping:
        """Where this node's hypervisor finds a volume, with its ``<disk>`` element."""

    async def info(self, volid: str) -> VolumeInfo:
        """A volume's attributes (size, format, owner, base)."""

    async def resize(self, volid: str, size: int) -> VolumeInfo:
        """Grow a volume to ``size`` bytes (shrinking is refused)."""

    async def snapshot(self, volid: str, snapname: str) -> None:
        """Snapshot a volume the hypervisor does not hold open."""

    async def rollback(self, volid: str, snapname: str) -> None:
        """Roll a volume back to a snapshot."""

    async def delete_snapshot(self, volid: str, snapname: str) -> None:
        """Delete a volume snapshot."""

    async def create_base(self, volid: str) -> VolumeInfo:
        """Turn a volume into a template base (``base-<vmid>-...``)."""

    async def clone(self, volid: str, vmid: int, options: CloneOptions) -> VolumeInfo:
        """A copy of ``volid`` owned by ``vmid``: linked to a base, or full."""

    async def owned_by(self, vmid: int) -> list[str]:
        """Every disk volume named for ``vmid`` on the enabled storages this node sees."""


@dataclass(frozen=True)
class CloneOptions:
    """How one disk is cloned: linked or full, from a snapshot, to a storage, in a format."""

    linked: bool = False
    snapname: str | None = None
    storage: str | None = None
    format: DiskFormat | None = None


@dataclass(frozen=True)
class DiskRequest:
    """A ``STORAGE:SIZE`` disk of a config: the key, the storage, the size in bytes, a format."""

    key: str
    storage: str
    size: int
    format: DiskFormat | None = None


def disk_file(value: str) -> str:
    """The ``file`` part of a disk value (``local:1,cache=none`` → ``local:1``)."""
    return value.split(",", 1)[0].removeprefix("file=")


def _is_empty_drive(value: str) -> bool:
    options = value.split(",")[1:]
    return "media=cdrom" in options and disk_file(value) in {"none", "cdrom"}


def disk_keys(config: Mapping[str, str]) -> list[str]:
    """The config's disk keys, in a stable order (so new disks are numbered predictably)."""
    return sorted(key for key in config if DISK_KEY.match(key))


def requested(config: Mapping[str, str]) -> list[DiskRequest]:
    """The disks the config asks the storage service to allocate."""
    found: list[DiskRequest] = []
    for key in disk_keys(config):
        match = NEW_DISK.match(disk_file(config[key]))
        if match is not None:
            size = int(float(match["size"]) * GIB)
            fmt = _option(config[key], "format")
            found.append(
                DiskRequest(
                    key=key,
                    storage=match["storage"],
                    size=size,
                    format=DiskFormat(fmt) if fmt in set(DiskFormat) else None,
                )
            )
    return found


def _option(value: str, name: str) -> str | None:
    for part in value.split(",")[1:]:
        key, _, text = part.partition("=")
        if key == name:
            return text
    return None


def volume_ids(config: Mapping[str, str]) -> dict[str, str]:
    """The disks that name a storage volume (``local:iso/x.iso``), by key."""
    found: dict[str, str] = {}
    for key in disk_keys(config):
        value = config[key]
        path = disk_file(value)
        if _is_empty_drive(value) or path.startswith("/") or NEW_DISK.match(path):
            continue
        if CLOUDINIT_VOLUME.match(path):
            continue  # the agent builds the seed image itself (cloudinit.py)
        found[key] = path
    return found


def format_size(size: int) -> str:
    """A byte count the way Proxmox writes ``size=`` (``PVE::JSONSchema::format_size``)."""
    units = ("", "K", "M", "G", "T")
    step = 0
    while step < len(units) - 1 and size and size % 1024 == 0:
        size //= 1024
        step += 1
    return f"{size}{units[step]}"


def recorded(value: str, volid: str, size: int) -> str:
    """The config value of an allocated disk: its volume id, its options, and its size.

    ``format`` has done its work once the volume exists, and Proxmox drops it too.
    """
    dropped = ("size=", "format=")
    options = [part for part in value.split(",")[1:] if part and not part.startswith(dropped)]
    options.append(f"size={format_size(size)}")
    return ",".join([volid, *sorted(options, key=lambda part: part.split("=", 1)[0])])


def owner(volid: str) -> int | None:
    """The VMID owning a disk volume, from its name; None for ISOs, templates and foreign names."""
    volname = volid.partition(":")[2]
    if volname.split("/", 1)[0] in NOT_DISKS:
        return None
    owners = OWNER.findall(volid)
    return int(owners[-1]) if owners else None


def owned_volumes(config: Mapping[str, str], vmid: int) -> list[str]:
    """The volumes of disks and ``unusedN`` entries that belong to ``vmid``, each once."""
    found: list[str] = []
    keys = [*disk_keys(config), *sorted(key for key in config if UNUSED_KEY.match(key))]
    for key in keys:
        value = config[key]
        volid = disk_file(value)
        if "media=cdrom" in value.split(",")[1:] or not VOLUME_ID.match(volid):
            continue
        if CLOUDINIT_VOLUME.match(volid):
            continue
        if NEW_DISK.match(volid) or owner(volid) != vmid or volid in found:
            continue
        found.append(volid)
    return found


def next_unused(config: Mapping[str, str]) -> str:
    """The first free ``unusedN`` key of ``config``."""
    index = 0
    while f"unused{index}" in config:
        index += 1
    return f"unused{index}"


def every_owned_volume(
    config: Mapping[str, str],
    pending: Mapping[str, str],
    snapshots: Mapping[str, Mapping[str, str]],
    vmid: int,
) -> list[str]:
    """The volumes ``vmid`` owns in its config, its pending changes and its snapshots, once each."""
    found: list[str] = []
    for section in [config, pending, *snapshots.values()]:
        for volid in owned_volumes(section, vmid):
            if volid not in found:
                found.append(volid)
    return found
