"""The GPU broker over a real nats-server: inventory, allocate and release, guest ends, restart.

The broker is wired as ``python -m rucher.gpu`` wires it (KV lease store, mappings, guest
directory, bus events, handlers), on a fake host that reacts like the kernel and NVML.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rucher.bus import KV, Bus, RucherError
from rucher.bus.codec import decode
from rucher.gpu.handlers import serve
from rucher.gpu.host import Host
from rucher.gpu.mappings import Mappings
from rucher.gpu.service import GpuBroker
from rucher.gpu.store import BusEvents, KvGuestDirectory, KvLeaseStore, KvMappings
from rucher.placement import ClusterView
from rucher.proto import compute, gpu
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import (
    DeviceAllocate,
    DeviceRelease,
    GpuInventory,
    GpuKind,
    GpuLease,
    InventoryPublished,
    PciDevice,
    ReleaseReason,
)
from rucher.proto.guest import GuestType
from rucher.proto.keys import make_key
from rucher.proto.streams import EVENTS, GPU_LEASES
from rucher.testing.nats import NatsServer

from ..unit.gpu_hosts import NODE, FakeNode, h200_node, synthetic_node
from .buses import connected, until

pytestmark = pytest.mark.integration


@dataclass
class Running:
    """A broker serving on the bus, and its host."""

    bus: Bus
    broker: GpuBroker
    node: FakeNode
    leases: KV[GpuLease]


@contextlib.asynccontextmanager
async def running_broker(url: str, node: FakeNode) -> AsyncIterator[Running]:
    """The broker wired as its composition root does, serving until the block ends."""
    async with connected(url, node=NODE, service="gpu") as bus:
        book = KvMappings(bus)
        broker = GpuBroker(
            NODE,
            Host(node.kernel, node.nvml),
            KvLeaseStore(bus, NODE),
            BusEvents(bus),
            book,
            KvGuestDirectory(bus, NODE),
        )
        await broker.reconcile()

        async def devices_of(name: str) -> list[PciDevice]:
            listing = await bus.request(gpu.PCI_LIST.to(node=name), gpu.PciListQuery())
            return list(listing.devices)

        consumer, subscriptions = await serve(bus, broker, Mappings(book, devices_of))
        try:
            yield Running(bus, broker, node, KV(bus, GPU_LEASES, GpuLease))
        finally:
            await consumer.stop()
            for subscription in subscriptions:
                await subscription.unsubscribe()


async def last_inventory(bus: Bus) -> GpuInventory:
    """The node's last published inventory, as the scheduler's feed reads it."""
    subject = gpu.INVENTORY_PUBLISHED.to(node=NODE).subject
    message = await bus.js.get_last_msg(EVENTS.name, subject)
    return decode(message.data, InventoryPublished).inventory


def allocate(kind: GpuKind, vmid: int, **fields: object) -> DeviceAllocate:
    """A request for ``vmid``'s first device."""
    lxc = kind is GpuKind.MIG
    return DeviceAllocate(
        command_id=f"c-{vmid}-{time.monotonic_ns()}",
        vmid=vmid,
        guest_type=GuestType.LXC if lxc else GuestType.QEMU,
        kind=kind,
        slot="dev0" if lxc else "hostpci0",
        **fields,  # type: ignore[arg-type]
    )


async def test_inventory_reaches_the_scheduler_and_mig_slices_come_and_go(
    nats_server: NatsServer, tmp_path: Path
):
    node = h200_node(tmp_path, gpus=2)
    async with running_broker(nats_server.url, node) as run:
        inventory = await last_inventory(run.bus)
        assert [d.address for d in inventory.devices if d.mig_enabled] == [
            "0000:00:06.0",
            "0000:41:00.0",
        ]
        view = ClusterView()
        view.set_gpu_inventory(inventory)

        address = gpu.DEVICE_ALLOCATE.to(node=NODE)
        reply = await run.bus.request(address, allocate(GpuKind.MIG, 300, mig_profile="3g.71gb"))
        lease = reply.lease
        assert lease.mig_instance is not None and lease.mig_instance.placement.start == 4
        stored = await run.leases.get(make_key(NODE, lease.lease_id))
        assert stored is not None and stored.value == lease

        async def shows_lease() -> bool:
            devices = (await last_inventory(run.bus)).devices
            return any(i.lease_id == lease.lease_id for d in devices for i in d.mig_instances)

        await until(shows_lease)
        view.set_gpu_inventory(await last_inventory(run.bus))

        with pytest.raises(RucherError) as refused:
            await run.bus.request(address, allocate(GpuKind.MIG, 301, mig_profile="2g.99gb"))
        assert refused.value.code is ErrorCode.INVALID

        release = DeviceRelease(command_id="rel-300", vmid=300, reason=ReleaseReason.REQUESTED)
        await run.bus.publish(gpu.DEVICE_RELEASE.to(node=NODE), release)

        async def released() -> bool:
            return await run.leases.get(make_key(NODE, lease.lease_id)) is None

        await until(released)
        assert node.nvml is not None
        assert node.nvml.mig_instances("0000:00:06.0") == []


async def test_a_stopped_guest_gives_its_mdev_back(nats_server: NatsServer, tmp_path: Path):
    node = synthetic_node(tmp_path)
    async with running_broker(nats_server.url, node) as run:
        address = gpu.DEVICE_ALLOCATE.to(node=NODE)
        reply = await run.bus.request(address, allocate(GpuKind.MDEV, 100, mdev_type="nvidia-1155"))
        assert node.kernel.mdevs() == [reply.lease.mdev_uuid]
        stopped = compute.VmStateChanged(
            event_id="stop-100", node=NODE, time=time.time(), vmid=100, state=PowerState.STOPPED
        )
        await run.bus.publish(compute.GUEST_STATE_CHANGED.to(node=NODE), stopped)
        await until(lambda: node.kernel.mdevs() == [])
        assert await run.leases.get(make_key(NODE, reply.lease.lease_id)) is None


async def test_a_restarted_broker_keeps_leases_and_never_hands_them_out_twice(
    nats_server: NatsServer, tmp_path: Path
):
    node = synthetic_node(tmp_path)
    async with running_broker(nats_server.url, node) as run:
        address = gpu.DEVICE_ALLOCATE.to(node=NODE)
        first = await run.bus.request(
            address, allocate(GpuKind.PASSTHROUGH, 100, address="0000:41:00.0")
        )
    assert node.kernel.driver("0000:41:00.0") == "vfio-pci"
    async with running_broker(nats_server.url, node) as run:
        inventory = await last_inventory(run.bus)
        leased = {d.address: d.lease_id for d in inventory.devices}
        assert leased["0000:41:00.0"] == first.lease.lease_id
        with pytest.raises(RucherError, match="leased to VM 100"):
            await run.bus.request(
                gpu.DEVICE_ALLOCATE.to(node=NODE),
                allocate(GpuKind.PASSTHROUGH, 101, address="0000:41:00.0"),
            )
        assert node.kernel.driver("0000:41:00.0") == "vfio-pci"
