"""``hostpciN`` through the GPU broker: parsing, admission, leases on start, release on stop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from rucher.bus import RucherError
from rucher.compute import admission, gpu
from rucher.compute.domain_xml import HostFacts, domain_name
from rucher.compute.drivers.fake import FakeHypervisor
from rucher.compute.service import ComputeService
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import (
    DeviceAllocate,
    DeviceAllocation,
    GpuKind,
    GpuLease,
    ReleaseReason,
)
from rucher.proto.guest import GuestType

from .test_compute_service import (
    NODE,
    Events,
    FakeVolumes,
    InlineTasks,
    MemoryGuests,
    World,
    command,
    create,
)

GPU = "0000:01:00.0"


def hostdev(address: str) -> str:
    bus, slot_function = address.split(":")[1:]
    slot, function = slot_function.split(".")
    return (
        "<hostdev mode='subsystem' type='pci' managed='no'><source>"
        f"<address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
        "</source></hostdev>"
    )


@dataclass
class FakeBroker:
    """The broker's rules in memory: one lease per guest slot, retries by command id."""

    devices: tuple[str, ...] = (GPU, "0000:02:00.0")
    mappings: dict[str, str] = field(default_factory=lambda: {"gpu-a": GPU})
    held: dict[str, GpuLease] = field(default_factory=dict)
    released: list[tuple[int, ReleaseReason]] = field(default_factory=list)
    # Releases are durable commands: applied later, when ``deliver`` is called.
    queued: list[str] = field(default_factory=list)
    deliver_at_once: bool = True
    made: int = 0

    async def allocate(self, command: DeviceAllocate) -> DeviceAllocation:
        for lease in self.held.values():
            if (lease.vmid, lease.slot) == (command.vmid, command.slot):
                if lease.command_id == command.command_id:
                    return DeviceAllocation(lease=lease, libvirt_hostdev=hostdev(lease.address))
                raise RucherError(ErrorCode.EXISTS, "already holds a lease", details={})
        address = self.mappings.get(command.mapping or "", command.address)
        if address not in self.devices:
            raise RucherError(
                ErrorCode.NOT_FOUND, f"node has no PCI device {address}", details={"field": "x"}
            )
        if any(lease.address == address for lease in self.held.values()):
            raise RucherError(ErrorCode.CONFLICT, f"{address} is leased", details={})
        lease = GpuLease(
            lease_id=f"L{self.made}-{command.slot}",
            node=NODE,
            vmid=command.vmid,
            guest_type=GuestType.QEMU,
            kind=command.kind,
            address=address,
            slot=command.slot,
            created=time.time(),
            mdev_type=command.mdev_type,
            command_id=command.command_id,
        )
        self.held[lease.lease_id] = lease
        self.made += 1
        return DeviceAllocation(lease=lease, libvirt_hostdev=hostdev(address))

    async def leases(self, vmid: int) -> list[GpuLease]:
        return [lease for lease in self.held.values() if lease.vmid == vmid]

    async def release(self, vmid: int, lease_id: str, reason: ReleaseReason) -> None:
        assert self.held.get(lease_id, None) is None or self.held[lease_id].vmid == vmid
        self.released.append((vmid, reason))
        self.queued.append(lease_id)
        if self.deliver_at_once:
            self.deliver()

    def deliver(self) -> None:
        for lease_id in self.queued:
            self.held.pop(lease_id, None)
        self.queued.clear()

    async def mapping_exists(self, name: str) -> bool:
        return name in self.mappings


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def world(broker: FakeBroker) -> World:
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
        gpu_broker=broker,
    )
    return World(hypervisor, guests, tasks, events, volumes, service)


@pytest.mark.parametrize(
    ("value", "address", "mapping", "mdev"),
    [
        ("0000:01:00.0", "0000:01:00.0", None, None),
        ("01:00", "0000:01:00.0", None, None),
        ("host=0A:1f.3,pcie=1,x-vga=1", "0000:0a:1f.3", None, None),
        ("mapping=gpu-a,mdev=nvidia-35", None, "gpu-a", "nvidia-35"),
    ],
)
def test_hostpci_values_become_broker_requests(value, address, mapping, mdev):
    (request,) = gpu.requests({"hostpci3": value})
    assert request == gpu.HostPci(key="hostpci3", address=address, mapping=mapping, mdev_type=mdev)


@pytest.mark.parametrize(
    "value",
    [
        "nonsense",
        "0000:01:00.0;0000:02:00.0",
        "0000:01:00.0,mapping=gpu-a",
        "pcie=1",
        "mapping=9bad",
        "0000:01:00.0,colour=blue",
        "0000:01:00.0,rombar=maybe",
    ],
)
def test_a_malformed_hostpci_is_invalid_naming_it(value):
    with pytest.raises(RucherError) as caught:
        admission.render(100, {"hostpci1": value}, HostFacts())
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details == {"field": "hostpci1"}


def test_a_slot_beyond_hostpci15_is_an_unknown_key():
    with pytest.raises(RucherError) as caught:
        admission.render(100, {"hostpci16": GPU}, HostFacts())
    assert caught.value.details == {"field": "hostpci16"}


def test_the_leased_hostdev_goes_into_the_domain_with_its_rom_options():
    xml = admission.render(
        100,
        {"hostpci0": f"{GPU},rombar=0,romfile=vbios.bin"},
        HostFacts(),
        hostdevs={"hostpci0": hostdev(GPU)},
    )
    assert 'bus="0x01"' in xml
    assert '<rom bar="off" file="/usr/share/kvm/vbios.bin" />' in xml
    # Only checked (no lease yet): no device at all.
    assert "<hostdev" not in admission.render(100, {"hostpci0": GPU}, HostFacts())


async def test_an_unknown_mapping_is_invalid_naming_the_key_and_creates_nothing(world):
    with pytest.raises(RucherError) as caught:
        await world.service.create(create(hostpci0="mapping=nosuch"))
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details == {"field": "hostpci0"}
    assert "nosuch" in caught.value.message
    assert world.guests.records == {}
    await world.service.create(create())
    with pytest.raises(RucherError) as caught:
        await world.service.update_config(
            command(compute.VmConfigUpdate, config={"hostpci2": "mapping=nosuch"})
        )
    assert caught.value.details == {"field": "hostpci2"}
    assert "hostpci2" not in world.guests.records[100].config


async def test_start_leases_each_device_puts_it_in_the_domain_and_stop_gives_it_back(world, broker):
    await world.service.create(create(hostpci0="mapping=gpu-a", hostpci1="0000:02:00.0"))
    assert broker.held == {}  # a create leases nothing
    await world.service.start(command(compute.VmStart))
    assert world.tasks.ended[-1] == ("qmstart", "OK")
    assert sorted((lease.slot, lease.address) for lease in broker.held.values()) == [
        ("hostpci0", GPU),
        ("hostpci1", "0000:02:00.0"),
    ]
    assert all(lease.kind is GpuKind.PASSTHROUGH for lease in broker.held.values())
    xml = world.hypervisor.domains_by_name[domain_name(100)].xml
    assert xml.count("<hostdev") == 2
    await world.service.stop(command(compute.VmStop))
    assert broker.held == {}
    assert broker.released[-1] == (100, ReleaseReason.GUEST_STOPPED)
    await world.service.start(command(compute.VmStart))
    assert len(broker.held) == 2
    await world.service.shutdown(command(compute.VmShutdown))
    assert broker.held == {}
    # A guest that powered itself off still holds its leases until it is destroyed.
    await world.service.start(command(compute.VmStart))
    world.hypervisor.domains_by_name[domain_name(100)].state = PowerState.STOPPED
    assert len(broker.held) == 2
    await world.service.destroy(command(compute.VmDestroy, purge=True))
    assert broker.held == {}
    assert broker.released[-2:] == [(100, ReleaseReason.GUEST_DESTROYED)] * 2


async def test_a_create_that_starts_the_guest_leases_its_devices(world, broker):
    await world.service.create(
        compute.VmCreate(
            command_id="c", vmid=100, user="root@pam", config={"hostpci0": GPU}, start=True
        )
    )
    assert world.tasks.ended[-1] == ("qmcreate", "OK")
    (lease,) = broker.held.values()
    assert lease.address == GPU
    assert "<hostdev" in world.hypervisor.domains_by_name[domain_name(100)].xml


async def test_a_device_that_cannot_be_had_fails_the_start_and_gives_back_the_others(world, broker):
    await world.service.create(create(hostpci0=GPU, hostpci1="0000:09:00.0"))
    await world.service.start(command(compute.VmStart))
    task, status = world.tasks.ended[-1]
    assert task == "qmstart"
    assert status.startswith("hostpci1: node has no PCI device 0000:09:00.0")
    assert broker.held == {}
    assert broker.released[-1] == (100, ReleaseReason.ALLOCATION_FAILED)
    assert world.hypervisor.domains_by_name[domain_name(100)].state is PowerState.STOPPED


async def test_a_start_libvirt_refuses_gives_the_devices_back(world, broker):
    await world.service.create(create(hostpci0=GPU))
    world.hypervisor.refuse_define = "vfio device busy"
    await world.service.start(command(compute.VmStart))
    assert world.tasks.ended[-1] == ("qmstart", "libvirt: vfio device busy")
    assert broker.held == {}
    assert broker.released[-1] == (100, ReleaseReason.ALLOCATION_FAILED)


async def test_a_stale_lease_of_the_stopped_guest_is_released_before_the_start_leases(
    world, broker
):
    await world.service.create(create(hostpci0=GPU))
    await world.service.start(command(compute.VmStart))
    # The guest stops behind the agent's back (its lease stays), the release arrives late.
    world.hypervisor.domains_by_name[domain_name(100)].state = PowerState.STOPPED
    broker.deliver_at_once = False
    asyncio.get_running_loop().call_later(0.3, broker.deliver)
    await world.service.start(compute.VmStart(command_id="second", vmid=100, user="root@pam"))
    assert world.tasks.ended[-1] == ("qmstart", "OK")
    (lease,) = broker.held.values()
    assert lease.command_id == "second.hostpci0"


async def test_a_release_applied_late_never_ends_the_next_starts_lease(world, broker):
    await world.service.create(create(hostpci0=GPU))
    await world.service.start(command(compute.VmStart))
    (first,) = broker.held.values()
    broker.deliver_at_once = False
    await world.service.stop(command(compute.VmStop))  # its release waits in the stream
    assert list(broker.held) == [first.lease_id]
    asyncio.get_running_loop().call_later(0.2, broker.deliver)
    await world.service.start(compute.VmStart(command_id="again", vmid=100, user="root@pam"))
    assert world.tasks.ended[-1] == ("qmstart", "OK")
    await world.service.stop(command(compute.VmStop))
    (second,) = broker.held.values()
    assert second.lease_id != first.lease_id
    # A redelivered release of the first lease changes nothing for the second.
    await broker.release(100, first.lease_id, ReleaseReason.GUEST_STOPPED)
    broker.deliver()
    assert broker.held == {}  # the second stop's own release, now delivered


async def test_without_a_broker_a_passthrough_start_fails_naming_the_key():
    hypervisor = FakeHypervisor()
    tasks = InlineTasks()
    service = ComputeService(
        hypervisor,
        MemoryGuests(),
        tasks,
        Events(),
        volumes=FakeVolumes(),
        node=NODE,
        facts=HostFacts(),
    )
    await service.create(create(hostpci0=GPU))
    await service.start(command(compute.VmStart))
    assert tasks.ended[-1][1].startswith("hostpci0: PCI passthrough needs the GPU broker")
    with pytest.raises(RucherError) as caught:
        await service.create(create(vmid=101, hostpci0="mapping=gpu-a"))
    assert caught.value.details == {"field": "hostpci0"}
