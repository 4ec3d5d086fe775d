"""The compute service's logic over the fake hypervisor: admission, undo, lifecycle, reconcile."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from rucher.bus import RucherError
from rucher.compute.disks import CloneOptions
from rucher.compute.domain_xml import HostFacts, domain_name
from rucher.compute.drivers.fake import FakeHypervisor
from rucher.compute.ports import TaskBody
from rucher.compute.reconcile import reconcile
from rucher.compute.service import ComputeService
from rucher.guests import config_digest
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.compute import DriftKind
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestRecord, GuestType
from rucher.proto.storage import (
    ContentType,
    DiskFormat,
    VolumeInfo,
    VolumeMapping,
    VolumeProtocol,
)

NODE = "n1"
USER = "root@pam"


class MemoryGuests:
    """The guest registry's semantics in a dict."""

    def __init__(self) -> None:
        self.records: dict[int, GuestRecord] = {}

    async def get(self, vmid: int) -> GuestRecord:
        if vmid not in self.records:
            raise RucherError(ErrorCode.NOT_FOUND, f"VM {vmid} does not exist")
        return self.records[vmid]

    async def list(self, *, node: str | None = None, guest_type: Any = None) -> list[GuestRecord]:
        return [r for r in self.records.values() if node is None or r.node == node]

    async def register(
        self,
        *,
        guest_type: GuestType,
        node: str,
        config: Mapping[str, str],
        vmid: int | None = None,
        lock: GuestLock | None = GuestLock.CREATE,
    ) -> GuestRecord:
        assert vmid is not None
        if vmid in self.records:
            raise RucherError(ErrorCode.EXISTS, f"VM {vmid} already exists")
        record = GuestRecord(
            vmid=vmid,
            type=guest_type,
            node=node,
            config=dict(config),
            digest=config_digest(config, lock),
            lock=lock,
        )
        self.records[vmid] = record
        return record

    async def update(
        self,
        vmid: int,
        *,
        changes: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        digest: str | None = None,
        lock_held: GuestLock | None = None,
    ) -> GuestRecord:
        record = await self.get(vmid)
        config = {**record.config, **(changes or {})}
        for key in delete:
            config.pop(key, None)
        self.records[vmid] = msgspec.structs.replace(record, config=config)
        return self.records[vmid]

    async def clear_lock(self, vmid: int, lock: GuestLock) -> GuestRecord:
        self.records[vmid] = msgspec.structs.replace(await self.get(vmid), lock=None)
        return self.records[vmid]

    async def set_lock(
        self, vmid: int, lock: GuestLock, *, digest: str | None = None
    ) -> GuestRecord:
        record = await self.get(vmid)
        if record.lock is not None:
            raise RucherError(ErrorCode.LOCKED, f"VM is locked ({record.lock})")
        self.records[vmid] = msgspec.structs.replace(record, lock=lock)
        return self.records[vmid]

    async def rewrite(
        self,
        vmid: int,
        change: Any,
        *,
        digest: str | None = None,
        lock_held: GuestLock | None = None,
    ) -> GuestRecord:
        record = await self.get(vmid)
        if digest is not None and digest != record.digest:
            raise RucherError(ErrorCode.CONFLICT, "modified")
        if record.lock is not None and record.lock is not lock_held:
            raise RucherError(ErrorCode.LOCKED, f"VM is locked ({record.lock})")
        changed = change(record)
        self.records[vmid] = msgspec.structs.replace(
            changed, digest=config_digest(changed.config, changed.lock)
        )
        return self.records[vmid]

    async def remove(
        self, vmid: int, *, digest: str | None = None, lock_held: GuestLock | None = None
    ) -> None:
        record = await self.get(vmid)
        if record.lock is not None and record.lock is not lock_held:
            raise RucherError(ErrorCode.LOCKED, f"VM is locked ({record.lock})")
        del self.records[vmid]


@dataclass
class Task:
    upid: str
    lines: list[str] = field(default_factory=list)

    async def log(self, text: str) -> None:
        self.lines.append(text)


@dataclass
class InlineTasks:
    """Runs each body to its end before answering, recording how it ended."""

    ended: list[tuple[str, str]] = field(default_factory=list)

    async def submit(
        self,
        *,
        task_type: str,
        task_id: str,
        user: str,
        body: TaskBody,
        command_id: str | None = None,
    ) -> str:
        upid = f"UPID:{NODE}:{task_type}:{task_id}:{len(self.ended)}"
        try:
            await body(Task(upid))
            self.ended.append((task_type, "OK"))
        except RucherError as err:
            self.ended.append((task_type, err.message))
        return upid


@dataclass
class Events:
    published: list[Any] = field(default_factory=list)

    async def emit(self, subject: Any, event: Any) -> None:
        self.published.append(event)


class FakeVolumes:
    """The storage service's volume calls over a dict, named as a ``dir`` storage names them."""

    def __init__(self, storages: Iterable[str] = ("local",)) -> None:
        self.storages = set(storages)
        self.volumes: dict[str, int] = {"local:iso/live.iso": 1 << 20}
        self.calls: list[tuple[str, str]] = []
        self.refuse_free: str | None = None
        self.refuse_snapshot: str | None = None
        self.refuse_clone: str | None = None
        self.snapshots: dict[str, set[str]] = {}

    async def allocate(
        self, storage: str, vmid: int, size: int, fmt: DiskFormat | None
    ) -> VolumeInfo:
        self.calls.append(("allocate", f"{storage}:{size}:{fmt}"))
        if storage not in self.storages:
            raise RucherError(ErrorCode.NOT_FOUND, f"storage '{storage}' does not exist")
        number = 0
        suffix = fmt or "raw"
        while any(v.startswith(f"{storage}:{vmid}/vm-{vmid}-disk-{number}.") for v in self.volumes):
            number += 1
        volid = f"{storage}:{vmid}/vm-{vmid}-disk-{number}.{suffix}"
        self.volumes[volid] = -(-size // 1024) * 1024
        return VolumeInfo(
            volid=volid, content=ContentType.IMAGES, format=suffix, size=self.volumes[volid]
        )

    async def free(self, volid: str) -> None:
        self.calls.append(("free", volid))
        if volid == self.refuse_free:
            raise RucherError(ErrorCode.INVALID, f"volume '{volid}' is protected")
        if self.volumes.pop(volid, None) is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"volume '{volid}' does not exist")

    def _info(self, volid: str) -> VolumeInfo:
        if volid not in self.volumes:
            raise RucherError(ErrorCode.NOT_FOUND, f"volume '{volid}' does not exist")
        fmt = volid.rsplit(".", 1)[-1]
        return VolumeInfo(
            volid=volid, content=ContentType.IMAGES, format=fmt, size=self.volumes[volid]
        )

    async def info(self, volid: str) -> VolumeInfo:
        return self._info(volid)

    async def resize(self, volid: str, size: int) -> VolumeInfo:
        self.calls.append(("resize", f"{volid}:{size}"))
        if size < self._info(volid).size:
            raise RucherError(ErrorCode.INVALID, "shrinking disks is not supported")
        self.volumes[volid] = size
        return self._info(volid)

    async def snapshot(self, volid: str, snapname: str) -> None:
        self._info(volid)
        if snapname in self.snapshots.setdefault(volid, set()):
            raise RucherError(ErrorCode.EXISTS, f"snapshot '{snapname}' already exists")
        if volid == self.refuse_snapshot:
            raise RucherError(ErrorCode.INTERNAL, "qemu-img: snapshot failed")
        self.snapshots[volid].add(snapname)
        self.calls.append(("snapshot", f"{volid}@{snapname}"))

    async def rollback(self, volid: str, snapname: str) -> None:
        if snapname not in self.snapshots.get(volid, set()):
            raise RucherError(ErrorCode.NOT_FOUND, f"snapshot '{snapname}' does not exist")
        self.calls.append(("rollback", f"{volid}@{snapname}"))

    async def delete_snapshot(self, volid: str, snapname: str) -> None:
        if snapname not in self.snapshots.get(volid, set()):
            raise RucherError(ErrorCode.NOT_FOUND, f"snapshot '{snapname}' does not exist")
        self.snapshots[volid].discard(snapname)
        self.calls.append(("delete_snapshot", f"{volid}@{snapname}"))

    async def create_base(self, volid: str) -> VolumeInfo:
        info = self._info(volid)
        base = volid.replace("/vm-", "/base-")
        self.volumes[base] = self.volumes.pop(volid)
        self.calls.append(("create_base", volid))
        return VolumeInfo(volid=base, content=info.content, format=info.format, size=info.size)

    async def clone(self, volid: str, vmid: int, options: CloneOptions) -> VolumeInfo:
        info = self._info(volid)
        if options.linked and "/base-" not in volid:
            raise RucherError(ErrorCode.INVALID, "linked clones need a base volume")
        if volid == self.refuse_clone:
            raise RucherError(ErrorCode.INTERNAL, "copy failed")
        storage = options.storage or volid.split(":", 1)[0]
        fmt = options.format.value if options.format else info.format
        allocated = await self.allocate(storage, vmid, info.size, DiskFormat(fmt))
        if options.linked:
            linked = f"{volid}/{allocated.volid.split(':', 1)[1]}"
            self.volumes[linked] = self.volumes.pop(allocated.volid)
            allocated = self._info(linked)
        self.calls.append(("clone", f"{volid}->{allocated.volid}"))
        return allocated

    async def owned_by(self, vmid: int) -> list[str]:
        return [volid for volid in self.volumes if f"/vm-{vmid}-" in volid]

    async def map(self, volid: str) -> VolumeMapping:
        self.calls.append(("map", volid))
        if volid not in self.volumes:
            raise RucherError(ErrorCode.NOT_FOUND, f"volume '{volid}' does not exist")
        path = f"/srv/{volid.replace(':', '/')}"
        iso = volid.endswith(".iso")
        fmt = DiskFormat.QCOW2 if volid.endswith(".qcow2") else DiskFormat.RAW
        device = "cdrom" if iso else "disk"
        readonly = "<readonly/>" if iso else ""
        return VolumeMapping(
            volid=volid,
            protocol=VolumeProtocol.FILE,
            path=path,
            format=fmt,
            libvirt_source=f"<source file='{path}'/>",
            libvirt_disk=(
                f"<disk type='file' device='{device}'><driver name='qemu' type='{fmt}'/>"
                f"<source file='{path}'/>{readonly}</disk>"
            ),
        )


@dataclass
class World:
    hypervisor: FakeHypervisor
    guests: MemoryGuests
    tasks: InlineTasks
    events: Events
    volumes: FakeVolumes
    service: ComputeService


@pytest.fixture
def world() -> World:
    hypervisor, guests, tasks, events = FakeHypervisor(), MemoryGuests(), InlineTasks(), Events()
    volumes = FakeVolumes()
    service = ComputeService(
        hypervisor,
        guests,
        tasks,
        events,
        volumes=volumes,
        node=NODE,
        facts=HostFacts(),
        shutdown_timeout=0.3,
    )
    return World(hypervisor, guests, tasks, events, volumes, service)


def create(vmid: int = 100, **config: str) -> compute.VmCreate:
    return compute.VmCreate(
        command_id=f"c{vmid}",
        vmid=vmid,
        user=USER,
        config={"memory": "256", "net0": "virtio,bridge=vmbr0", **config},
    )


def command(kind: type[Any], vmid: int = 100, **fields: Any) -> Any:
    return kind(command_id="x", vmid=vmid, user=USER, **fields)


async def test_create_defines_the_domain_clears_the_lock_and_gives_the_nic_a_mac(world):
    await world.service.create(create())
    record = world.guests.records[100]
    assert record.lock is None
    assert record.config["net0"].startswith("virtio=BC:24:11:")
    assert record.config["net0"].endswith(",bridge=vmbr0")
    assert domain_name(100) in world.hypervisor.domains_by_name
    assert world.tasks.ended == [("qmcreate", "OK")]
    assert any(isinstance(event, compute.VmCreated) for event in world.events.published)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"memory": "999999"}, "memory"),
        ({"cores": "64"}, "cores"),
        ({"net0": "virtio,bridge=nosuchbr"}, "net0"),
        ({"net0": "virtio,bridge=vmbr0,bogus=1"}, "net0"),
        ({"frobnicate": "1"}, "frobnicate"),
        ({"memory": "lots"}, "memory"),
        ({"boot": "xyz"}, "boot"),
    ],
)
async def test_bad_input_is_invalid_naming_the_field_and_creates_nothing(world, config, field):
    with pytest.raises(RucherError) as caught:
        await world.service.create(create(**config))
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details == {"field": field}
    assert world.guests.records == {}
    assert world.hypervisor.domains_by_name == {}
    assert world.tasks.ended == []


async def test_a_taken_vmid_is_invalid_and_the_existing_guest_is_untouched(world):
    await world.service.create(create())
    before = world.guests.records[100]
    with pytest.raises(RucherError) as caught:
        await world.service.create(create(memory="128"))
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details == {"field": "vmid"}
    assert world.guests.records[100] == before


async def test_new_disks_are_allocated_recorded_as_volume_ids_and_defined(world):
    await world.service.create(
        create(
            scsi0="local:1,format=qcow2,cache=writeback",
            virtio1="local:0.5",
            ide2="local:iso/live.iso,media=cdrom",
        )
    )
    assert world.tasks.ended == [("qmcreate", "OK")]
    config = world.guests.records[100].config
    assert config["scsi0"] == "local:100/vm-100-disk-0.qcow2,cache=writeback,size=1G"
    assert config["virtio1"] == "local:100/vm-100-disk-1.raw,size=512M"
    assert config["ide2"] == "local:iso/live.iso,media=cdrom"
    assert world.guests.records[100].lock is None
    xml = world.hypervisor.domains_by_name["rucher-100"].xml
    assert "/srv/local/100/vm-100-disk-0.qcow2" in xml
    assert 'cache="writeback"' in xml
    assert xml.count("<readonly />") == 1  # the ISO's, not twice


async def test_a_refused_definition_frees_the_allocated_volumes(world):
    world.hypervisor.refuse_define = "unsupported machine type"
    await world.service.create(create(scsi0="local:1", scsi1="local:2"))
    assert world.tasks.ended == [("qmcreate", "libvirt: unsupported machine type")]
    assert world.guests.records == {}
    assert list(world.volumes.volumes) == ["local:iso/live.iso"]
    assert ("free", "local:100/vm-100-disk-1.raw") in world.volumes.calls


async def test_an_allocation_that_fails_frees_the_ones_before_it(world):
    await world.service.create(create(scsi0="local:1", scsi1="nosuch:1"))
    assert world.tasks.ended == [("qmcreate", "storage 'nosuch' does not exist")]
    assert world.guests.records == {}
    assert list(world.volumes.volumes) == ["local:iso/live.iso"]


@pytest.mark.parametrize(
    ("disk", "message"),
    [
        ("local:100/vm-100-disk-9.qcow2", "does not exist"),
        ("vm-100-disk-0.qcow2", "unable to parse volume ID"),
    ],
)
async def test_an_unknown_volume_is_invalid_naming_the_disk_and_creates_nothing(
    world, disk, message
):
    with pytest.raises(RucherError, match=message) as caught:
        await world.service.create(create(scsi0=disk))
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details == {"field": "scsi0"}
    assert world.guests.records == {}
    assert world.tasks.ended == []


async def test_destroy_frees_the_guests_own_volumes_and_leaves_others(world):
    world.volumes.volumes["local:200/vm-200-disk-0.qcow2"] = 1 << 30
    await world.service.create(
        create(
            scsi0="local:1,format=qcow2",
            scsi1="local:200/vm-200-disk-0.qcow2",
            ide2="local:iso/live.iso,media=cdrom",
        )
    )
    await world.guests.update(100, changes={"unused0": "local:100/vm-100-disk-0.qcow2"})
    await world.service.destroy(command(compute.VmDestroy, purge=True))
    assert world.tasks.ended[-1] == ("qmdestroy", "OK")
    assert sorted(world.volumes.volumes) == ["local:200/vm-200-disk-0.qcow2", "local:iso/live.iso"]
    assert world.guests.records == {}


async def test_a_volume_that_cannot_be_freed_does_not_stop_the_destroy(world):
    await world.service.create(create(scsi0="local:1", scsi1="local:1"))
    world.volumes.refuse_free = "local:100/vm-100-disk-0.raw"
    await world.service.destroy(command(compute.VmDestroy))
    assert world.tasks.ended[-1] == ("qmdestroy", "OK")
    assert "local:100/vm-100-disk-0.raw" in world.volumes.volumes
    assert "local:100/vm-100-disk-1.raw" not in world.volumes.volumes
    assert world.guests.records == {}


async def test_start_maps_the_volumes_again(world):
    await world.service.create(create(scsi0="local:1"))
    world.volumes.calls.clear()
    await world.service.start(command(compute.VmStart))
    assert world.volumes.calls == [("map", "local:100/vm-100-disk-0.raw")]


async def test_a_new_disk_on_a_config_change_is_allocated_and_defined(world):
    await world.service.create(create())
    await world.service.update_config(command(compute.VmConfigUpdate, config={"scsi1": "local:1"}))
    assert world.tasks.ended[-1] == ("qmconfig", "OK")
    assert world.guests.records[100].config["scsi1"] == "local:100/vm-100-disk-0.raw,size=1G"
    assert "vm-100-disk-0.raw" in world.hypervisor.domains_by_name[domain_name(100)].xml


async def test_a_refused_definition_undoes_the_registration_and_fails_the_task(world):
    world.hypervisor.refuse_define = "unsupported machine type"
    await world.service.create(create())
    assert world.tasks.ended == [("qmcreate", "libvirt: unsupported machine type")]
    assert world.guests.records == {}
    assert world.hypervisor.domains_by_name == {}


async def test_lifecycle_start_status_shutdown_destroy(world):
    service = world.service
    await service.create(create())
    await service.start(command(compute.VmStart))
    report = await service.status(compute.VmStatusQuery(vmid=100))
    assert report.status is PowerState.RUNNING
    assert report.maxmem == 256 << 20
    with pytest.raises(RucherError, match="already running"):
        await service.start(command(compute.VmStart))
    await service.suspend(command(compute.VmSuspend))
    assert (await service.status(compute.VmStatusQuery(vmid=100))).status is PowerState.PAUSED
    await service.resume(command(compute.VmResume))
    with pytest.raises(RucherError, match="is running - destroy failed"):
        await service.destroy(command(compute.VmDestroy))
    await service.shutdown(command(compute.VmShutdown))
    assert (await service.status(compute.VmStatusQuery(vmid=100))).status is PowerState.STOPPED
    await service.destroy(command(compute.VmDestroy, purge=True))
    assert world.guests.records == {}
    assert world.hypervisor.domains_by_name == {}
    assert all(status == "OK" for _, status in world.tasks.ended), world.tasks.ended


async def test_a_shutdown_the_guest_ignores_fails_or_is_forced(world):
    service = world.service
    await service.create(create())
    await service.start(command(compute.VmStart))
    world.hypervisor.ignore_shutdown = True
    await service.shutdown(command(compute.VmShutdown, timeout=0))
    assert world.tasks.ended[-1] == ("qmshutdown", "VM quit/powerdown failed - got timeout")
    await service.shutdown(command(compute.VmShutdown, timeout=0, force_stop=True))
    assert world.tasks.ended[-1] == ("qmshutdown", "OK")
    assert (await service.status(compute.VmStatusQuery(vmid=100))).status is PowerState.STOPPED


async def test_start_applies_config_changed_meanwhile(world):
    service = world.service
    await service.create(create())
    await service.update_config(command(compute.VmConfigUpdate, config={"memory": "384"}))
    await service.start(command(compute.VmStart))
    assert '<memory unit="MiB">384</memory>' in world.hypervisor.domains_by_name["rucher-100"].xml


async def test_a_guest_of_another_node_is_not_found_here(world):
    await world.guests.register(
        guest_type=GuestType.QEMU, node="n2", config={}, vmid=200, lock=None
    )
    with pytest.raises(RucherError) as caught:
        await world.service.start(command(compute.VmStart, vmid=200))
    assert caught.value.code is ErrorCode.NOT_FOUND


async def test_reconcile_removes_orphans_redefines_missing_and_undoes_interrupted_creates(world):
    hypervisor, guests = world.hypervisor, world.guests
    await hypervisor.define("<domain><name>rucher-300</name></domain>")  # no document
    await hypervisor.define("<domain><name>someone-else</name></domain>")  # not Rucher's
    await guests.register(
        guest_type=GuestType.QEMU, node=NODE, config={"memory": "128"}, vmid=301, lock=None
    )
    world.volumes.volumes["local:302/vm-302-disk-0.qcow2"] = 1 << 30
    await guests.register(
        guest_type=GuestType.QEMU,
        node=NODE,
        config={"scsi0": "local:302/vm-302-disk-0.qcow2,size=1G", "scsi1": "local:1"},
        vmid=302,
    )
    drift = await reconcile(world.service)
    kinds = {event.vmid: event.kind for event in drift}
    assert kinds == {
        300: DriftKind.UNKNOWN_DOMAIN,
        301: DriftKind.ADOPTED,
        302: DriftKind.MISSING_DOMAIN,
    }
    assert set(hypervisor.domains_by_name) == {"someone-else", "rucher-301"}
    assert set(guests.records) == {301}
    assert "local:302/vm-302-disk-0.qcow2" not in world.volumes.volumes


async def test_capacity_reports_the_host(world):
    capacity = await world.service.capacity()
    assert capacity.node == NODE
    assert capacity.cpus == 4
    assert capacity.memory_total == 8 << 30
    assert capacity.kvm is False
