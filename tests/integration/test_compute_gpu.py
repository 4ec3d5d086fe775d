"""``hostpciN`` end to end: the compute agent's leases from the real GPU broker over NATS.

The broker runs as its composition root wires it, on a fake host tree that reacts like the
kernel (drivers bound to ``vfio-pci``, mdevs made and removed); the compute service runs as its
own composition root wires it (bus clients, task runner, handlers) on libvirt's ``test:///default``
driver, which keeps and "runs" a domain with host devices that do not exist, so the domain XML
the agent produced and each lease's lifecycle can be checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.compute.__main__ import BusEvents, BusVolumes
from rucher.compute.domain_xml import HostFacts, domain_name
from rucher.compute.drivers.libvirt import LibvirtHypervisor
from rucher.compute.gpu import BusBroker
from rucher.compute.handlers import serve
from rucher.compute.service import ComputeService
from rucher.guests import GuestRegistry
from rucher.proto import compute, gpu
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import GpuKind, PciMapping, PciMappingEntry
from rucher.proto.task import TaskStatus
from rucher.registry import ServiceRegistry, describe_self, instance_key
from rucher.tasks import TaskRunner, TaskStore
from rucher.testing.nats import NatsServer

from ..unit.gpu_hosts import L40S, NODE, NVIDIA, synthetic_node
from .buses import connected, until
from .test_gpu_broker import Running, running_broker

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.integration

USER = "root@pam"
WHOLE = "0000:41:00.0"  # with its audio function 0000:41:00.1 in IOMMU group 20
VGPU = "0000:43:00.0"  # offers nvidia-1155
SHARED_GROUP = "0000:42:00.0"  # shares its IOMMU group with the host's NIC: refused


@contextlib.asynccontextmanager
async def compute_agent(url: str) -> AsyncIterator[ComputeService]:
    """The compute service on ``NODE`` wired as ``python -m rucher.compute`` wires it."""
    async with connected(url, node=NODE, service="compute") as bus:
        me = describe_self(bus)
        await ServiceRegistry(bus).register(me, ttl=15)
        runner = TaskRunner(bus, worker=instance_key(me))
        await runner.start()
        service = ComputeService(
            LibvirtHypervisor("test:///default", kvm=False),
            GuestRegistry(bus),
            runner,
            BusEvents(bus),
            volumes=BusVolumes(bus),
            node=NODE,
            facts=HostFacts(),
            gpu_broker=BusBroker(bus),
        )
        await serve(bus, service)
        yield service


async def ended(bus: Bus, upid: str) -> str:
    """The task's exit status once it stopped."""
    store = TaskStore(bus)
    status: list[str] = []

    async def stopped() -> bool:
        state = await store.get(upid)
        if state.status is TaskStatus.STOPPED:
            status.append(state.exitstatus or "")
            return True
        return False

    await until(stopped, timeout=30)
    return status[0]


async def ask(bus: Bus, subject, kind, vmid: int, **fields) -> str:  # type: ignore[no-untyped-def]
    reply = await bus.request(
        subject.to(node=NODE), kind(command_id=new_id(), vmid=vmid, user=USER, **fields)
    )
    return reply.upid


def domain_xml(service: ComputeService, vmid: int) -> str:
    """The domain as libvirt keeps it (the agent's connection to the test driver)."""
    assert isinstance(service.hypervisor, LibvirtHypervisor)
    return service.hypervisor._conn().lookupByName(domain_name(vmid)).XMLDesc(0)


async def leases_of(run: Running, vmid: int) -> dict[str, object]:
    """The guest's leases in the broker's store, by slot."""
    return {
        entry.value.slot: entry.value
        for entry in await run.leases.entries()
        if entry.value is not None and entry.value.vmid == vmid
    }


async def test_a_vm_leases_its_devices_on_start_and_gives_them_back(
    nats_server: NatsServer, tmp_path: Path
):
    node = synthetic_node(tmp_path)
    vmid = 4242
    async with (
        running_broker(nats_server.url, node) as run,
        compute_agent(nats_server.url) as service,
        connected(nats_server.url, node=NODE, service="client") as bus,
    ):
        mapping = PciMapping(
            id="l40s-vgpu",
            mdev=True,
            map=(PciMappingEntry(node=NODE, path=VGPU, vendor_id=NVIDIA, device_id=L40S),),
        )
        await bus.request(
            gpu.MAPPING_CREATE.address, gpu.MappingCreate(command_id=new_id(), mapping=mapping)
        )

        # An unknown mapping or a malformed value: refused naming the key, nothing created.
        for key, value in (("hostpci0", "mapping=nosuch"), ("hostpci1", "0000:41:00.0;02:00")):
            with pytest.raises(RucherError) as caught:
                await ask(bus, compute.GUEST_CREATE, compute.VmCreate, vmid, config={key: value})
            assert caught.value.code is ErrorCode.INVALID
            assert caught.value.details == {"field": key}
        with pytest.raises(RucherError):
            await GuestRegistry(bus).get(vmid)

        config = {
            "memory": "64",
            "hostpci0": f"{WHOLE},pcie=1,x-vga=1",
            "hostpci1": "mapping=l40s-vgpu,mdev=nvidia-1155",
        }
        upid = await ask(bus, compute.GUEST_CREATE, compute.VmCreate, vmid, config=config)
        assert await ended(bus, upid) == "OK"
        assert await leases_of(run, vmid) == {}  # a create leases nothing

        upid = await ask(bus, compute.GUEST_START, compute.VmStart, vmid)
        assert await ended(bus, upid) == "OK"
        leases = await leases_of(run, vmid)
        assert sorted(leases) == ["hostpci0", "hostpci1"]
        whole, vgpu = leases["hostpci0"], leases["hostpci1"]
        assert whole.kind is GpuKind.PASSTHROUGH and whole.address == WHOLE
        assert vgpu.kind is GpuKind.MDEV and vgpu.address == VGPU
        assert node.kernel.driver(WHOLE) == "vfio-pci"
        assert node.kernel.driver("0000:41:00.1") == "vfio-pci"
        assert node.kernel.mdevs() == [vgpu.mdev_uuid]
        xml = domain_xml(service, vmid)
        assert xml.count("<hostdev ") == 3  # both functions of the GPU, and the vGPU
        assert "bus='0x41' slot='0x00' function='0x0'" in xml
        assert "bus='0x41' slot='0x00' function='0x1'" in xml
        assert f"<address uuid='{vgpu.mdev_uuid}'/>" in xml

        upid = await ask(bus, compute.GUEST_STOP, compute.VmStop, vmid)
        assert await ended(bus, upid) == "OK"

        async def given_back() -> bool:
            return await leases_of(run, vmid) == {}

        await until(given_back)
        assert node.kernel.driver(WHOLE) == "nvidia"
        assert node.kernel.driver("0000:41:00.1") == "snd_hda_intel"
        assert node.kernel.mdevs() == []

        # A device the broker refuses fails the start naming its key; the one leased before
        # it is given back and the guest stays stopped.
        upid = await ask(
            bus,
            compute.GUEST_CONFIG_UPDATE,
            compute.VmConfigUpdate,
            vmid,
            config={"hostpci1": SHARED_GROUP},
        )
        assert await ended(bus, upid) == "OK"
        upid = await ask(bus, compute.GUEST_START, compute.VmStart, vmid)
        status = await ended(bus, upid)
        assert status.startswith("hostpci1: "), status
        await until(given_back)
        assert node.kernel.driver(WHOLE) == "nvidia"
        info = await service.hypervisor.info(domain_name(vmid))
        assert info is not None and info.state.value == "stopped"
