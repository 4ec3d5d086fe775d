"""Proxmox volume names: parse and build them per storage type, the way ``pvesm`` names volumes.

A volume id is ``STORAGE:VOLNAME``. On a ``dir`` storage a disk is
``<vmid>/vm-<vmid>-disk-<n>.<fmt>`` (a linked clone also names its base:
``<basevmid>/base-...qcow2/<vmid>/vm-...qcow2``), an ISO is ``iso/<file>``, a container template
``vztmpl/<file>``. On ``rbd`` a disk is ``vm-<vmid>-disk-<n>`` and a linked clone
``base-<basevmid>-disk-<n>/vm-<vmid>-disk-<m>``. The owner is the ``<vmid>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import ContentType, DiskFormat, StorageType

IMAGE_FORMATS = (DiskFormat.RAW.value, DiskFormat.QCOW2.value, DiskFormat.VMDK.value)
_DISK_NAME = re.compile(r"^(?P<kind>vm|base)-(?P<vmid>\d+)-[A-Za-z0-9._+-]+$")
_SUBVOL_NAME = re.compile(r"^(?P<kind>subvol|basevol)-(?P<vmid>\d+)-[A-Za-z0-9._+-]+$")
_FILE_EXTENSIONS: dict[ContentType, tuple[str, ...]] = {
    ContentType.ISO: (".iso", ".img"),
    ContentType.VZTMPL: (".tar.gz", ".tar.xz", ".tar.zst", ".tgz"),
    ContentType.BACKUP: (".vma", ".vma.zst", ".vma.gz", ".vma.lzo", ".tar", ".tar.zst",
                         ".tar.gz", ".tar.lzo", ".tgz"),
    ContentType.SNIPPETS: ("",),
}  # fmt: skip
# Where each kind of file content lives under a dir storage's path.
FILE_FOLDERS: dict[ContentType, str] = {
    ContentType.ISO: "template/iso",
    ContentType.VZTMPL: "template/cache",
    ContentType.BACKUP: "dump",
    ContentType.SNIPPETS: "snippets",
}
_PREFIX: dict[ContentType, str] = {
    ContentType.ISO: "iso",
    ContentType.VZTMPL: "vztmpl",
    ContentType.BACKUP: "backup",
    ContentType.SNIPPETS: "snippets",
}
_BACKUP_OWNER = re.compile(r"^vzdump-(?:qemu|lxc)-(\d+)-")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class VolName:
    """A parsed volume name: what it holds, its file or image name, owner and linked base."""

    content: ContentType
    name: str
    vmid: int | None
    format: str
    base: str | None = None
    base_vmid: int | None = None

    @property
    def is_base(self) -> bool:
        """Whether this is a template base (the source of linked clones)."""
        return self.name.startswith(("base-", "basevol-"))

    @property
    def stem(self) -> str:
        """The disk name without a format extension (``vm-100-disk-0``)."""
        suffix = f".{self.format}"
        return self.name[: -len(suffix)] if self.name.endswith(suffix) else self.name


def invalid(message: str, field: str = "volid") -> RucherError:
    """A parameter error naming the field."""
    return RucherError(ErrorCode.INVALID, message, details={"field": field})


def split_volid(volid: str) -> tuple[str, str]:
    """``STORAGE:VOLNAME`` into its two parts."""
    storage, sep, volname = volid.partition(":")
    if not sep or not storage or not volname:
        raise invalid(f"unable to parse volume ID '{volid}'")
    return storage, volname


def _disk(name: str, vmid: int | None, fmt: str | None) -> VolName:
    match = _DISK_NAME.match(name) or _SUBVOL_NAME.match(name)
    if match is None:
        raise invalid(f"unable to parse volume name '{name}'")
    owner = int(match["vmid"])
    if vmid is not None and vmid != owner:
        raise invalid(f"volume name '{name}' does not belong to VM {vmid}")
    if match["kind"] in {"subvol", "basevol"}:
        return VolName(ContentType.ROOTDIR, name, owner, DiskFormat.SUBVOL.value)
    if fmt is None:
        return VolName(ContentType.IMAGES, name, owner, DiskFormat.RAW.value)
    extension = name.rsplit(".", 1)[-1]
    if extension not in IMAGE_FORMATS:
        raise invalid(f"unable to parse volume name '{name}' (no raw, qcow2 or vmdk extension)")
    return VolName(ContentType.IMAGES, name, owner, extension)


def parse(storage_type: StorageType, volname: str) -> VolName:
    """Parse a volume name of a storage of ``storage_type``; ``invalid`` when it is not one."""
    if storage_type is StorageType.RBD:
        base, _, name = volname.rpartition("/")
        disk = _disk(name, None, None)
        if base:
            parent = _disk(base, None, None)
            if not parent.is_base:
                raise invalid(f"'{base}' is not a base image")
            return VolName(disk.content, name, disk.vmid, disk.format, base, parent.vmid)
        return disk
    parts = volname.split("/")
    if len(parts) == 2 and parts[0].isdigit():
        return _disk(parts[1], int(parts[0]), "file")
    if len(parts) == 4 and parts[0].isdigit() and parts[2].isdigit():
        parent = _disk(parts[1], int(parts[0]), "file")
        disk = _disk(parts[3], int(parts[2]), "file")
        if not parent.is_base:
            raise invalid(f"'{parts[1]}' is not a base image")
        return VolName(disk.content, disk.name, disk.vmid, disk.format, parent.name, parent.vmid)
    if len(parts) == 2:
        for content, prefix in _PREFIX.items():
            if parts[0] == prefix:
                return file_volume(content, parts[1])
    raise invalid(f"unable to parse directory volume name '{volname}'")


def file_volume(content: ContentType, filename: str, field: str = "volid") -> VolName:
    """An ISO, template, backup or snippet file's volume; its extension must fit ``content``."""
    if not _FILE_NAME.match(filename) or ".." in filename:
        raise invalid(f"illegal file name '{filename}'", field)
    lower = filename.lower()
    extensions = _FILE_EXTENSIONS.get(content)
    if extensions is None:
        raise invalid(f"content type '{content}' is not a file", "content")
    if not any(lower.endswith(extension) for extension in extensions):
        wanted = ", ".join(extensions)
        raise invalid(f"wrong file extension for {content} '{filename}' (expected {wanted})", field)
    vmid = None
    if content is ContentType.BACKUP and (match := _BACKUP_OWNER.match(filename)):
        vmid = int(match[1])
    fmt = next((e.lstrip(".") for e in extensions if e and lower.endswith(e)), "")
    return VolName(content, filename, vmid, fmt)


def build(storage_type: StorageType, vol: VolName) -> str:
    """The volume name of ``vol`` on a storage of ``storage_type`` (inverse of :func:`parse`)."""
    if vol.content in _PREFIX:
        return f"{_PREFIX[vol.content]}/{vol.name}"
    if storage_type is StorageType.RBD:
        return f"{vol.base}/{vol.name}" if vol.base else vol.name
    if vol.base is not None:
        return f"{vol.base_vmid}/{vol.base}/{vol.vmid}/{vol.name}"
    return f"{vol.vmid}/{vol.name}"


def disk_name(
    storage_type: StorageType, vmid: int, index: int, fmt: str, *, base: bool = False
) -> str:
    """The name Proxmox gives disk ``index`` of ``vmid`` (``vm-100-disk-0.qcow2`` on dir)."""
    if fmt == DiskFormat.SUBVOL.value:
        return f"{'basevol' if base else 'subvol'}-{vmid}-disk-{index}"
    stem = f"{'base' if base else 'vm'}-{vmid}-disk-{index}"
    return stem if storage_type is StorageType.RBD else f"{stem}.{fmt}"


def requested_name(
    storage_type: StorageType, vmid: int, filename: str, fmt: str | None
) -> tuple[str, str]:
    """Check a caller's ``filename`` for a new disk of ``vmid``; returns (name, format).

    As Proxmox: the name starts ``vm-<vmid>-``; on dir an extension sets the format (and must
    agree with ``format``), and one is added when missing.
    """
    if not filename.startswith((f"vm-{vmid}-", f"subvol-{vmid}-")):
        raise invalid(f"illegal name '{filename}' - should be 'vm-{vmid}-*'", "filename")
    if storage_type is StorageType.RBD:
        if fmt not in (None, DiskFormat.RAW.value):
            raise invalid(f"unsupported format '{fmt}' on rbd", "format")
        _disk(filename, vmid, None)
        return filename, DiskFormat.RAW.value
    if filename.startswith("subvol-"):
        _disk(filename, vmid, None)
        return filename, DiskFormat.SUBVOL.value
    extension = filename.rsplit(".", 1)[-1] if "." in filename else ""
    if extension in IMAGE_FORMATS:
        if fmt is not None and fmt != extension:
            raise invalid(f"format '{fmt}' does not match filename '{filename}'", "format")
        _disk(filename, vmid, "file")
        return filename, extension
    chosen = fmt or DiskFormat.RAW.value
    named = f"{filename}.{chosen}"
    _disk(named, vmid, "file")
    return named, chosen
