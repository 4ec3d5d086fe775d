"""The compute service's logic over the fake hypervisor: admission, undo, lifecycle, reconcile."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from rucher.bus import RucherError
from rucher.compute.domain_xml import HostFacts, domain_name
from rucher.compute.drivers.fake import FakeHypervisor
from rucher.compute.reconcile import reconcile
from rucher.compute.service import ComputeService, TaskBody
from rucher.guests import config_digest
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.compute import DriftKind
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestRecord, GuestType

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


@dataclass
class World:
    hypervisor: FakeHypervisor
    guests: MemoryGuests
    tasks: InlineTasks
    events: Events
    service: ComputeService


@pytest.fixture
def world() -> World:
    hypervisor, guests, tasks, events = FakeHypervisor(), MemoryGuests(), InlineTasks(), Events()
    service = ComputeService(
        hypervisor, guests, tasks, events, node=NODE, facts=HostFacts(), shutdown_timeout=0.3
    )
    return World(hypervisor, guests, tasks, events, service)


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


async def test_a_disk_to_allocate_needs_the_storage_service(world):
    with pytest.raises(RucherError) as caught:
        await world.service.create(create(scsi0="local:8"))
    assert caught.value.code is ErrorCode.UNSUPPORTED
    assert caught.value.details == {"field": "scsi0"}
    assert world.guests.records == {}


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
    await guests.register(guest_type=GuestType.QEMU, node=NODE, config={}, vmid=302)
    drift = await reconcile(world.service)
    kinds = {event.vmid: event.kind for event in drift}
    assert kinds == {
        300: DriftKind.UNKNOWN_DOMAIN,
        301: DriftKind.ADOPTED,
        302: DriftKind.MISSING_DOMAIN,
    }
    assert set(hypervisor.domains_by_name) == {"someone-else", "rucher-301"}
    assert set(guests.records) == {301}


async def test_capacity_reports_the_host(world):
    capacity = await world.service.capacity()
    assert capacity.node == NODE
    assert capacity.cpus == 4
    assert capacity.memory_total == 8 << 30
    assert capacity.kvm is False
