"""The storage service's logic over fake drivers: every check made before a change, and what
each operation changes, reports and refuses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType
from rucher.proto.storage import (
    ContentListQuery,
    ContentType,
    DiskFormat,
    OrphanQuery,
    StorageDefinition,
    StorageRecord,
    StorageStatusQuery,
    StorageType,
    VolumeAllocate,
    VolumeClone,
    VolumeCreateBase,
    VolumeFree,
    VolumeInfoQuery,
    VolumeMap,
    VolumeRename,
    VolumeResize,
    VolumeSnapshotCreate,
    VolumeSnapshotDelete,
    VolumeUpdate,
)
from rucher.storage.copies import Copier
from rucher.storage.drivers import NodeContext
from rucher.storage.drivers.fake import FakeDriver
from rucher.storage.inuse import attached_volumes
from rucher.storage.pool import DriverPool
from rucher.storage.revert import Revert
from rucher.storage.service import StorageService

GIB = 1 << 30
ALL = tuple(ContentType)


class MemoryBook:
    """Definitions in a dict, with the bucket's create/replace/delete semantics."""

    def __init__(self, records: list[StorageRecord] | None = None) -> None:
        self.records = {r.definition.storage: r for r in records or []}

    async def get(self, storage: str) -> StorageRecord | None:
        return self.records.get(storage)

    async def all(self) -> list[StorageRecord]:
        return [self.records[s] for s in sorted(self.records)]

    async def create(self, record: StorageRecord) -> None:
        if record.definition.storage in self.records:
            raise RucherError(ErrorCode.EXISTS, "exists")
        self.records[record.definition.storage] = record

    async def replace(
        self, storage: str, change: Callable[[StorageRecord], StorageRecord]
    ) -> StorageRecord:
        if storage not in self.records:
            raise RucherError(ErrorCode.NOT_FOUND, "absent", details={"field": "storage"})
        self.records[storage] = change(self.records[storage])
        return self.records[storage]

    async def delete(self, storage: str) -> None:
        if self.records.pop(storage, None) is None:
            raise RucherError(ErrorCode.NOT_FOUND, "absent", details={"field": "storage"})


@dataclass
class Guests:
    known: dict[int, GuestType] = field(default_factory=dict)
    configs: dict[int, dict[str, str]] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)
    owners: dict[int, str] = field(default_factory=dict)  # node by VMID; n1 when absent

    async def guests(self) -> dict[int, GuestType]:
        return dict(self.known)

    async def running_users(self, volid: str, node: str | None = None) -> list[int]:
        return [vmid for vmid, config in self.configs.items()
                if vmid in self.running and volid in attached_volumes(config)
                and (node is None or self.owners.get(vmid, "n1") == node)]  # fmt: skip


@dataclass
class Events:
    sent: list[tuple[str, Any]] = field(default_factory=list)

    def emit(self, address: Any, event: Any) -> None:
        self.sent.append((address.subject, event))

    def of(self, kind: type) -> list[Any]:
        return [event for _, event in self.sent if isinstance(event, kind)]


def definition(
    storage: str, kind: StorageType = StorageType.DIR, **fields: Any
) -> StorageDefinition:
    extra: dict[str, Any] = {"path": f"/srv/{storage}"} if kind is StorageType.DIR else {
        "monhost": ("10.0.0.1",), "pool": "rbd", "shared": True}  # fmt: skip
    content = ALL if kind is StorageType.DIR else (ContentType.IMAGES, ContentType.ROOTDIR)
    return StorageDefinition(
        storage=storage, storage_type=kind, content=fields.pop("content", content),
        **{**extra, **fields},
    )  # fmt: skip


@dataclass
class World:
    service: StorageService
    drivers: dict[str, FakeDriver]
    book: MemoryBook
    guests: Guests
    events: Events
    staging: Path


@pytest.fixture
def world(tmp_path: Path) -> World:
    definitions = [
        definition("local"),
        definition("ceph", StorageType.RBD),
        definition("small"),
        definition("isos", content=(ContentType.ISO,)),
        definition("off", disable=True),
        definition("elsewhere", nodes=("n2",)),
    ]
    drivers = {d.storage: FakeDriver(d) for d in definitions}
    drivers["small"].capacity = GIB
    book = MemoryBook([StorageRecord(definition=d) for d in definitions])

    def build(record: StorageRecord, _node: NodeContext) -> FakeDriver:
        return drivers[record.definition.storage]

    registry: Any = {StorageType.DIR: build, StorageType.RBD: build}
    pool = DriverPool(
        node="n1", book=book, context=NodeContext(local_path=tmp_path), registry=registry
    )
    guests, events = Guests(), Events()
    staging = tmp_path / "staging"
    service = StorageService(
        node="n1", pool=pool, guests=guests, events=events, copier=Copier(pool, staging)
    )
    return World(service, drivers, book, guests, events, staging)


def cid() -> str:
    return "c" + str(id(object()))


async def refused(call: Any, code: ErrorCode, field: str | None) -> RucherError:
    with pytest.raises(RucherError) as caught:
        await call
    assert caught.value.code is code, caught.value
    assert caught.value.details.get("field") == field, caught.value.details
    return caught.value


async def allocate(world: World, storage: str = "local", vmid: int = 100, **fields: Any):
    fields.setdefault("size", GIB)
    command = VolumeAllocate(command_id=cid(), storage=storage, vmid=vmid, **fields)
    return (await world.service.allocate(command)).volume


# Allocation ---------------------------------------------------------------------------------


async def test_allocation_names_the_next_free_disk_in_the_proxmox_layout(world):
    first = await allocate(world, format=DiskFormat.QCOW2)
    second = await allocate(world)
    rbd = await allocate(world, "ceph")

    assert first.volid == "local:100/vm-100-disk-0.qcow2" and first.format == "qcow2"
    assert second.volid == "local:100/vm-100-disk-1.raw"  # raw: Proxmox's default on dir
    assert rbd.volid == "ceph:vm-100-disk-0" and rbd.vmid == 100
    assert [e.volid for e in world.events.of(type(world.events.sent[0][1]))][:1] == [first.volid]


async def test_a_requested_name_must_belong_to_the_vm_and_match_the_format(world):
    named = await allocate(world, filename="vm-100-disk-7", format=DiskFormat.QCOW2)
    assert named.volid == "local:100/vm-100-disk-7.qcow2"

    await refused(allocate(world, filename="vm-101-disk-0"), ErrorCode.INVALID, "filename")
    await refused(
        allocate(world, filename="vm-100-disk-8.raw", format=DiskFormat.QCOW2),
        ErrorCode.INVALID,
        "format",
    )
    await refused(allocate(world, "ceph", format=DiskFormat.QCOW2), ErrorCode.INVALID, "format")


async def test_an_existing_name_is_refused_and_nothing_changes(world):
    await allocate(world, filename="vm-100-disk-0.raw")
    before = dict(world.drivers["local"].volumes)

    await refused(allocate(world, filename="vm-100-disk-0.raw"), ErrorCode.EXISTS, "filename")
    assert world.drivers["local"].volumes == before


async def test_unknown_disabled_and_foreign_storages_are_refused_naming_the_storage(world):
    await refused(allocate(world, "nowhere"), ErrorCode.NOT_FOUND, "storage")
    await refused(allocate(world, "off"), ErrorCode.INVALID, "storage")
    await refused(allocate(world, "elsewhere"), ErrorCode.INVALID, "storage")


async def test_a_content_type_the_storage_does_not_hold_is_refused(world):
    await refused(allocate(world, "isos"), ErrorCode.INVALID, "content")
    await refused(allocate(world, content=ContentType.ISO), ErrorCode.INVALID, "content")


async def test_allocating_beyond_the_free_space_is_refused_before_anything_is_made(world):
    error = await refused(allocate(world, "small", size=2 * GIB), ErrorCode.INVALID, "size")

    assert error.details["available"] == GIB
    assert world.drivers["small"].volumes == {}
    assert "allocate" not in world.drivers["small"].calls


async def test_a_zero_size_disk_is_refused_and_sizes_round_up_to_a_kib(world):
    await refused(allocate(world, size=0), ErrorCode.INVALID, "size")
    assert (await allocate(world, size=1000)).size == 1024


async def test_a_failed_allocation_leaves_no_volume_and_no_event(world):
    world.drivers["local"].fail_on.add("allocate")

    await refused(allocate(world), ErrorCode.INTERNAL, None)
    assert world.drivers["local"].volumes == {}
    assert world.events.sent == []


# Removal, resize, attributes ----------------------------------------------------------------


async def test_freeing_a_protected_volume_is_refused(world):
    volume = await allocate(world)
    await world.service.update(VolumeUpdate(command_id=cid(), volid=volume.volid, protected=True))

    await refused(world.service.free(VolumeFree(command_id=cid(), volid=volume.volid)),
                  ErrorCode.INVALID, "volid")  # fmt: skip
    assert volume.volid.split(":")[1] in world.drivers["local"].volumes


async def test_the_api_cannot_free_a_disk_whose_guest_exists_but_its_agent_can(world):
    volume = await allocate(world)
    world.guests.known[100] = GuestType.QEMU
    api = VolumeFree(command_id=cid(), volid=volume.volid, check_owner=True)

    error = await refused(world.service.free(api), ErrorCode.INVALID, "volid")
    assert "a guest with VMID '100' exists" in error.message

    await world.service.free(VolumeFree(command_id=cid(), volid=volume.volid))
    assert world.drivers["local"].volumes == {}


async def test_a_local_volume_a_running_guest_elsewhere_names_is_not_attached_here(world):
    # After a migration that copied its disk, the guest on n2 names the same volume id as the
    # copy n1 still holds: n1's copy is nobody's disk and may go; a shared one may not.
    local, shared = await allocate(world), await allocate(world, "ceph")
    world.guests.configs[100] = {"scsi0": local.volid, "scsi1": shared.volid}
    world.guests.running.add(100)
    world.guests.owners[100] = "n1"
    await refused(world.service.free(VolumeFree(command_id=cid(), volid=local.volid)),
                  ErrorCode.INVALID, "volid")  # fmt: skip

    world.guests.owners[100] = "n2"
    await world.service.free(VolumeFree(command_id=cid(), volid=local.volid))
    assert world.drivers["local"].volumes == {}
    await refused(world.service.free(VolumeFree(command_id=cid(), volid=shared.volid)),
                  ErrorCode.INVALID, "volid")  # fmt: skip


async def test_a_base_with_linked_clones_is_not_freed_and_the_clones_are_named(world):
    volume = await allocate(world, "ceph")
    base = (
        await world.service.create_base(VolumeCreateBase(command_id=cid(), volid=volume.volid))
    ).volume
    clone = (
        await world.service.clone(
            VolumeClone(command_id=cid(), volid=base.volid, vmid=101, linked=True)
        )
    ).volume

    error = await refused(world.service.free(VolumeFree(command_id=cid(), volid=base.volid)),
                          ErrorCode.INVALID, "volid")  # fmt: skip
    assert clone.volid in error.message
    assert base.volid == "ceph:base-100-disk-0"
    assert clone.volid == "ceph:base-100-disk-0/vm-101-disk-0" and clone.parent == base.volid


async def test_resize_grows_only(world):
    volume = await allocate(world, "small", size=GIB // 2)

    def resize(size: int):
        return world.service.resize(VolumeResize(command_id=cid(), volid=volume.volid, size=size))

    await refused(resize(GIB // 4), ErrorCode.INVALID, "size")
    assert (await resize(GIB // 2)).volume.size == GIB // 2
    await refused(resize(2 * GIB), ErrorCode.INVALID, "size")  # more than is free
    assert (await resize(GIB)).volume.size == GIB


async def test_notes_and_protection_are_volume_attributes(world):
    volume = await allocate(world)
    changed = await world.service.update(
        VolumeUpdate(command_id=cid(), volid=volume.volid, notes="golden", protected=True)
    )
    info = await world.service.volume_info(VolumeInfoQuery(volid=volume.volid))

    assert changed.volume.notes == info.volume.notes == "golden" and info.volume.protected


async def test_an_unknown_volume_is_not_found_and_a_bad_volid_is_invalid(world):
    await refused(world.service.volume_info(VolumeInfoQuery(volid="local:100/vm-100-disk-9.raw")),
                  ErrorCode.NOT_FOUND, "volid")  # fmt: skip
    await refused(world.service.volume_info(VolumeInfoQuery(volid="local:nonsense")),
                  ErrorCode.INVALID, "volid")  # fmt: skip


# Snapshots, clones, owners ------------------------------------------------------------------


async def test_snapshot_names_are_unique_per_volume(world):
    volume = await allocate(world, "ceph")
    take = VolumeSnapshotCreate(command_id=cid(), volid=volume.volid, snapname="before")

    await world.service.snapshot_create(take)
    await refused(world.service.snapshot_create(take), ErrorCode.EXISTS, "snapname")
    gone = VolumeSnapshotDelete(command_id=cid(), volid=volume.volid, snapname="missing")
    await refused(world.service.snapshot_delete(gone), ErrorCode.NOT_FOUND, "snapname")


async def test_a_linked_clone_needs_a_base_and_stays_on_its_storage(world):
    volume = await allocate(world, "ceph")
    linked = VolumeClone(command_id=cid(), volid=volume.volid, vmid=101, linked=True)

    await refused(world.service.clone(linked), ErrorCode.INVALID, "volid")
    base = await world.service.create_base(VolumeCreateBase(command_id=cid(), volid=volume.volid))
    elsewhere = VolumeClone(command_id=cid(), volid=base.volume.volid, vmid=101, linked=True,
                            storage="local")  # fmt: skip
    await refused(world.service.clone(elsewhere), ErrorCode.INVALID, "storage")


async def test_a_full_clone_to_another_storage_goes_through_a_staged_raw_file(world):
    volume = await allocate(world, "ceph", size=3 * GIB)
    full = VolumeClone(command_id=cid(), volid=volume.volid, vmid=102, storage="local",
                       format=DiskFormat.QCOW2)  # fmt: skip

    copy = (await world.service.clone(full)).volume

    assert copy.volid == "local:102/vm-102-disk-0.qcow2" and copy.size == 3 * GIB
    assert list(world.staging.iterdir()) == []
    assert world.events.sent[-1][1].source == volume.volid


async def test_a_full_clone_that_fails_midway_leaves_no_target_and_no_staged_file(world):
    volume = await allocate(world, "ceph")
    world.drivers["local"].fail_on.add("import_raw")
    full = VolumeClone(command_id=cid(), volid=volume.volid, vmid=102, storage="local")

    await refused(world.service.clone(full), ErrorCode.INTERNAL, None)
    assert world.drivers["local"].volumes == {}
    assert list(world.staging.iterdir()) == []


async def test_a_full_clone_beyond_the_target_s_free_space_is_refused(world):
    volume = await allocate(world, size=2 * GIB)
    full = VolumeClone(command_id=cid(), volid=volume.volid, vmid=102, storage="small")

    await refused(world.service.clone(full), ErrorCode.INVALID, "size")
    assert world.drivers["small"].volumes == {}


async def test_rename_gives_a_disk_to_another_owner(world):
    volume = await allocate(world)
    moved = await world.service.rename(VolumeRename(command_id=cid(), volid=volume.volid, vmid=200))

    assert moved.volume.volid == "local:200/vm-200-disk-0.raw" and moved.volume.vmid == 200
    assert world.events.sent[-1][1].new_volid == moved.volume.volid


async def test_map_describes_the_disk_for_libvirt(world):
    volume = await allocate(world, format=DiskFormat.QCOW2)
    mapping = await world.service.map(VolumeMap(command_id=cid(), volid=volume.volid))

    assert mapping.path.endswith("vm-100-disk-0.qcow2")
    assert '<driver name="qemu" type="qcow2" />' in mapping.libvirt_disk


# Listing, status, orphans -------------------------------------------------------------------


async def test_content_lists_filter_by_owner_and_tell_container_disks_apart(world):
    await allocate(world, vmid=100)
    await allocate(world, vmid=200)
    world.guests.known.update({100: GuestType.QEMU, 200: GuestType.LXC})

    def listing(**query: Any):
        return world.service.content_list(ContentListQuery(storage="local", **query))

    assert [v.vmid for v in (await listing()).volumes] == [100, 200]
    assert [v.vmid for v in (await listing(vmid=200)).volumes] == [200]
    assert [v.vmid for v in (await listing(content=ContentType.ROOTDIR)).volumes] == [200]
    assert [v.vmid for v in (await listing(content=ContentType.IMAGES)).volumes] == [100]
    isos = ContentListQuery(storage="isos", content=ContentType.IMAGES)
    await refused(world.service.content_list(isos), ErrorCode.INVALID, "content")


async def test_status_lists_the_node_s_storages_with_their_space(world):
    world.drivers["ceph"].fail_on.add("status")
    report = {s.storage: s for s in (await world.service.status(StorageStatusQuery())).storages}

    assert "elsewhere" not in report  # not on this node
    assert report["local"].active and report["local"].total == 100 * GIB
    assert not report["off"].active and not report["off"].enabled
    assert not report["ceph"].active and report["ceph"].shared
    only = await world.service.status(
        StorageStatusQuery(content=ContentType.ISO, enabled_only=True)
    )
    assert {s.storage for s in only.storages} == {"local", "isos", "small"}
    await refused(world.service.status(StorageStatusQuery(storage="nowhere")),
                  ErrorCode.NOT_FOUND, "storage")  # fmt: skip


async def test_orphans_are_reported_and_published_never_deleted(world):
    await allocate(world, vmid=100)
    await allocate(world, "ceph", vmid=300)
    world.guests.known[100] = GuestType.QEMU

    report = await world.service.orphans(OrphanQuery())

    assert [v.volid for v in report.volumes] == ["ceph:vm-300-disk-0"]
    assert [e.volid for _, e in world.events.sent if hasattr(e, "detail")] == ["ceph:vm-300-disk-0"]
    assert "vm-300-disk-0" in world.drivers["ceph"].volumes


# Undo steps ---------------------------------------------------------------------------------


async def test_undo_steps_run_newest_first_on_failure_and_not_at_all_on_success():
    done: list[str] = []

    def step(name: str):
        async def undo() -> None:
            if name == "broken":
                raise OSError("cannot")
            done.append(name)

        return undo

    async with Revert() as revert:
        revert.add("a", step("a"))
    assert done == []

    async def fail_midway() -> None:
        async with Revert() as revert:
            revert.add("a", step("a"))
            revert.add("broken", step("broken"))
            revert.add("c", step("c"))
            raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        await fail_midway()
    assert done == ["c", "a"]
