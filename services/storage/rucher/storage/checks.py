"""Checks made before any change: content type, disk format and name, free space."""

from __future__ import annotations

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import ContentType, StorageDefinition
from rucher.storage import volnames
from rucher.storage.drivers.interface import NewDisk, StorageDriver
from rucher.storage.volnames import invalid

KIB = 1024


def gib(size: int) -> str:
    """A size for messages."""
    return f"{size / (1 << 30):.2f} GiB"


def kib_rounded(size: int) -> int:
    """Sizes go to the next KiB, the unit Proxmox counts disks in."""
    return -(-size // KIB) * KIB


def check_content(definition: StorageDefinition, content: ContentType) -> None:
    """Refuse a content type the storage does not hold (field ``content``)."""
    if content not in definition.content:
        raise invalid(
            f"storage '{definition.storage}' does not support content type '{content}'", "content"
        )


async def check_space(driver: StorageDriver, size: int) -> None:
    """Refuse to use more than the storage has available (field ``size``)."""
    capacity = await driver.status()
    if not capacity.active:
        raise RucherError(
            ErrorCode.UNAVAILABLE,
            f"storage '{driver.definition.storage}' is not online",
            details={"field": "storage"},
        )
    if size > capacity.avail:
        raise RucherError(
            ErrorCode.INVALID,
            f"not enough free space on storage '{driver.definition.storage}': {gib(size)} "
            f"requested, {gib(capacity.avail)} available",
            details={"field": "size", "requested": size, "available": capacity.avail},
        )


def disk_format(driver: StorageDriver, content: ContentType, wanted: str | None) -> str:
    """The format of a new disk: ``wanted`` if the storage takes it, else its default."""
    formats = driver.formats(content)
    fmt = wanted or formats[0]
    if fmt not in formats:
        raise invalid(
            f"unsupported format '{fmt}' for {content} on storage "
            f"'{driver.definition.storage}' (supported: {', '.join(formats)})",
            "format",
        )
    return fmt


def new_disk(
    driver: StorageDriver,
    definition: StorageDefinition,
    *,
    vmid: int,
    size: int,
    fmt: str | None,
    filename: str | None,
    content: ContentType = ContentType.IMAGES,
) -> NewDisk:
    """A disk to be made on ``driver``'s storage, its format and name checked."""
    if filename is not None:
        name, fmt = volnames.requested_name(definition.storage_type, vmid, filename, fmt)
        disk_format(driver, content, fmt)
        return NewDisk(vmid=vmid, size=size, format=fmt, name=name, content=content)
    return NewDisk(vmid=vmid, size=size, format=disk_format(driver, content, fmt), content=content)
