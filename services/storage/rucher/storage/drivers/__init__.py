"""Storage drivers by Proxmox storage type: the registry the driver pool builds from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import StorageRecord, StorageType
from rucher.storage.drivers.interface import StorageDriver
from rucher.storage.drivers.qemu_img import QemuImg


@dataclass(frozen=True)
class NodeContext:
    """What drivers need from the node: its own ``local`` folder, qemu-img, Ceph client settings."""

    local_path: Path
    qemu_img: QemuImg = field(default_factory=QemuImg)
    ceph_settings: dict[str, str] = field(default_factory=dict)


DriverFactory = Callable[[StorageRecord, NodeContext], StorageDriver]


def build_dir(record: StorageRecord, node: NodeContext) -> StorageDriver:
    """A dir driver; a definition without a path (the built-in ``local``) uses the node's folder."""
    from rucher.storage.drivers.dir import DirDriver

    path = Path(record.definition.path) if record.definition.path else node.local_path
    return DirDriver(record.definition, path=path, qemu_img=node.qemu_img)


def build_rbd(record: StorageRecord, node: NodeContext) -> StorageDriver:
    """An rbd driver (loads the rados/rbd bindings on first use)."""
    from rucher.storage.drivers.rbd import RbdDriver

    return RbdDriver(record.definition, key=record.keyring, settings=node.ceph_settings)


REGISTRY: dict[StorageType, DriverFactory] = {
    StorageType.DIR: build_dir,
    StorageType.RBD: build_rbd,
}


def build(
    record: StorageRecord, node: NodeContext, registry: dict[StorageType, DriverFactory]
) -> StorageDriver:
    """The driver for one definition."""
    factory = registry.get(record.definition.storage_type)
    if factory is None:
        raise RucherError(
            ErrorCode.UNSUPPORTED,
            f"storage type '{record.definition.storage_type}' is not available on this node",
        )
    return factory(record, node)
