"""The GPU broker on fake hosts reacting like the kernel and NVML: allocate, release, reconcile."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from rucher.bus import RucherError
from rucher.gpu.drivers.interface import NVML_INSUFFICIENT_RESOURCES, NvmlError
from rucher.gpu.host import discover
from rucher.gpu.mig import geometry_of
from rucher.gpu.pciids import PciNames
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import (
    DeviceAllocate,
    DeviceRelease,
    GpuKind,
    MigPlacement,
    PciMapping,
    PciMappingEntry,
    ReleaseReason,
    VgpuType,
)
from rucher.proto.guest import GuestType

from .gpu_hosts import (
    H200_ID,
    L40S,
    NODE,
    NVIDIA,
    FakeNode,
    h200_node,
    h200_nvml,
    synthetic_node,
)
from .test_placement_mig import h200_placements, h200_profiles

PCI = "bus/pci/devices"
_ids = iter(range(1_000_000))


def request(
    kind: GpuKind, vmid: int = 100, *, lxc: bool = False, **fields: object
) -> DeviceAllocate:
    """A DeviceAllocate for ``vmid``'s first slot."""
    return DeviceAllocate(
        command_id=f"c{next(_ids)}",
        vmid=vmid,
        guest_type=GuestType.LXC if lxc else GuestType.QEMU,
        kind=kind,
        slot=str(fields.pop("slot", "dev0" if lxc else "hostpci0")),
        **fields,  # type: ignore[arg-type]
    )


def drivers(node: FakeNode, *addresses: str) -> list[str | None]:
    """Where each function's ``driver`` link points on disk."""
    return [node.kernel.driver(address) for address in addresses]


def host_writes(node: FakeNode) -> list[tuple[str, str]]:
    """Writes that change the host (bind, unbind, overrides, mdev create/remove)."""
    return list(node.kernel.writes)


# Discovery ---------------------------------------------------------------------------------------


def test_discovery_reads_the_captured_h200_host(tmp_path):
    node = h200_node(tmp_path, mig=False)
    devices, version = discover(node.kernel, node.nvml)
    assert version == "580.159.04"
    by_address = {d.address: d for d in devices}
    assert len(by_address) == 7
    gpu = by_address["0000:00:06.0"]
    assert (gpu.vendor_id, gpu.device_id, gpu.class_code) == (NVIDIA, H200_ID, "030200")
    assert (gpu.subsystem_vendor_id, gpu.subsystem_device_id) == ("10de", "18bf")
    assert gpu.driver == "nvidia" and gpu.reset_method == ("flr",)
    assert gpu.iommu_group is None and gpu.numa_node is None  # a VM guest: no IOMMU, NUMA -1
    assert gpu.uuid == "GPU-2546f794-6e50-36c5-e314-624ebb841bbe"
    assert gpu.memory == 150754820096 and not gpu.mig_enabled
    assert by_address["0000:00:01.0"].driver == "virtio-pci"


def test_discovery_names_devices_from_pci_ids_and_nvml(tmp_path):
    ids = tmp_path / "pci.ids"
    ids.write_text("1af4  Red Hat, Inc.\n\t1041  Virtio 1.0 network device\n")
    node = h200_node(tmp_path, mig=False)
    devices = {d.address: d for d in discover(node.kernel, node.nvml, PciNames(ids))[0]}
    nic = devices["0000:00:03.0"]
    assert (nic.vendor_name, nic.device_name) == ("Red Hat, Inc.", "Virtio 1.0 network device")
    assert devices["0000:00:06.0"].device_name == "NVIDIA H200"  # NVML's name for its GPUs


def test_discovery_reads_groups_vfs_and_vgpu_types(tmp_path):
    node = synthetic_node(tmp_path)
    devices = {d.address: d for d in discover(node.kernel, None)[0]}
    gpu = devices["0000:41:00.0"]
    assert gpu.iommu_group == 20
    assert gpu.iommu_group_members == ("0000:40:01.0", "0000:41:00.0", "0000:41:00.1")
    assert gpu.numa_node == 0 and gpu.reset_method == ("flr", "bus")
    vgpu = devices["0000:43:00.0"]
    assert [(t.type_id, t.available_instances) for t in vgpu.mdev_types] == [
        ("nvidia-1155", 4),
        ("nvidia-1156", 2),
    ]
    assert vgpu.mdev_types[0].name == "NVIDIA L40S-12Q"
    assert devices["0000:44:00.0"].sriov_totalvfs == 4
    assert devices["0000:44:00.5"].physfn == "0000:44:00.0"


def test_vgpu_types_come_from_nvml_only_under_the_vgpu_host_driver(tmp_path):
    node = h200_node(tmp_path, gpus=2, mig=False)
    assert node.nvml is not None
    assert h200_nvml()["gpus"][0]["supported_vgpus"] == "ERR Not Supported"
    vgpu = VgpuType(type_id=1234, name="NVIDIA H200-35C", vgpu_class="Compute",
                    framebuffer=35 << 30, max_instances=4, creatable=True)  # fmt: skip
    node.nvml.table["0000:41:00.0"].vgpu_types = (vgpu,)
    devices = {d.address: d for d in discover(node.kernel, node.nvml)[0]}
    assert devices["0000:00:06.0"].vgpu_types == ()  # the captured host has no vGPU driver
    assert devices["0000:41:00.0"].vgpu_types == (vgpu,)


def test_mig_profiles_come_from_nvml_with_the_real_placements(tmp_path):
    node = h200_node(tmp_path)
    gpu = next(d for d in discover(node.kernel, node.nvml)[0] if d.address == "0000:00:06.0")
    assert gpu.mig_enabled
    assert {p.profile_id: p.placements for p in gpu.mig_profiles} == h200_placements()


# Passthrough -------------------------------------------------------------------------------------


async def test_passthrough_binds_the_whole_group_and_release_restores_drivers(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    allocation = await broker.allocate(request(GpuKind.PASSTHROUGH, address="0000:41:00.0"))
    lease = allocation.lease
    assert drivers(node, "0000:41:00.0", "0000:41:00.1", "0000:40:01.0") == [
        "vfio-pci",
        "vfio-pci",
        "pcieport",  # bridges stay with the host
    ]
    assert os.readlink(tmp_path / "sys" / PCI / "0000:41:00.1" / "driver").endswith("vfio-pci")
    assert lease.original_drivers == {"0000:41:00.0": "nvidia", "0000:41:00.1": "snd_hda_intel"}
    assert allocation.libvirt_hostdev is not None
    assert allocation.libvirt_hostdev.count("<hostdev ") == 2
    assert "bus='0x41' slot='0x00' function='0x1'" in allocation.libvirt_hostdev
    assert node.store.leases == {lease.lease_id: lease}
    inventory = node.events.inventories[-1]
    assert {d.address: d.lease_id for d in inventory.devices}["0000:41:00.0"] == lease.lease_id

    await broker.release(
        DeviceRelease(command_id="r1", vmid=100, reason=ReleaseReason.GUEST_STOPPED)
    )
    assert drivers(node, "0000:41:00.0", "0000:41:00.1") == ["nvidia", "snd_hda_intel"]
    assert node.kernel.read(f"{PCI}/0000:41:00.0/driver_override") == "(null)"
    assert node.store.leases == {}
    assert node.events.ended == [(lease.lease_id, ReleaseReason.GUEST_STOPPED)]


async def test_a_bind_failing_halfway_through_the_group_rolls_every_function_back(tmp_path):
    node = synthetic_node(tmp_path)
    kernel_write = node.kernel.write

    def flaky(path: str, value: str) -> None:
        if path == "bus/pci/drivers_probe" and value == "0000:41:00.1":
            raise OSError(5, "Input/output error", path)  # the audio function will not probe
        kernel_write(path, value)

    node.kernel.write = flaky  # type: ignore[method-assign]
    broker = node.broker()
    await broker.reconcile()
    with pytest.raises(RucherError, match="binding to vfio-pci failed"):
        await broker.allocate(request(GpuKind.PASSTHROUGH, address="0000:41:00.0"))
    assert drivers(node, "0000:41:00.0", "0000:41:00.1") == ["nvidia", "snd_hda_intel"]
    for function in ("0000:41:00.0", "0000:41:00.1"):
        assert node.kernel.read(f"{PCI}/{function}/driver_override") == "(null)"
    assert node.store.leases == {}  # the pending record went with the change


async def test_a_retry_gets_the_same_lease_and_a_taken_slot_is_refused(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    command = request(GpuKind.PASSTHROUGH, address="0000:41:00.0")
    first = await broker.allocate(command)
    again = await broker.allocate(command)
    assert again.lease == first.lease and len(node.store.leases) == 1
    with pytest.raises(RucherError) as taken:  # another request for the same guest slot
        await broker.allocate(request(GpuKind.MDEV, mdev_type="nvidia-1155"))
    assert taken.value.code is ErrorCode.EXISTS and "release it first" in taken.value.message
    assert node.kernel.mdevs() == []


async def test_an_incomplete_iommu_group_is_refused_and_nothing_is_bound(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    before = host_writes(node)
    with pytest.raises(RucherError) as refused:
        await broker.allocate(request(GpuKind.PASSTHROUGH, address="0000:42:00.0"))
    assert refused.value.code is ErrorCode.CONFLICT
    assert "0000:05:00.0" in refused.value.message and "not whole" in refused.value.message
    assert host_writes(node) == before
    assert drivers(node, "0000:42:00.0", "0000:05:00.0") == ["nvidia", "igb"]
    assert node.store.leases == {}


async def test_a_device_already_leased_is_refused(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    await broker.allocate(request(GpuKind.PASSTHROUGH, address="0000:41:00.0"))
    before = host_writes(node)
    with pytest.raises(RucherError) as refused:
        await broker.allocate(request(GpuKind.PASSTHROUGH, 101, address="0000:41:00.0"))
    assert "leased to VM 100 (hostpci0)" in refused.value.message
    assert host_writes(node) == before and len(node.store.leases) == 1


async def test_a_group_holding_a_device_in_use_is_refused(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    await broker.allocate(request(GpuKind.MDEV, 100, mdev_type="nvidia-1155"))
    before = host_writes(node)
    with pytest.raises(RucherError) as refused:
        await broker.allocate(request(GpuKind.PASSTHROUGH, 101, address="0000:43:00.0"))
    assert "mediated device" in refused.value.message
    assert host_writes(node) == before
    assert drivers(node, "0000:43:00.0") == ["nvidia"]


async def test_a_model_request_takes_a_free_gpu_and_skips_the_unusable_ones(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    first = await broker.allocate(
        request(GpuKind.PASSTHROUGH, 100, vendor_id=NVIDIA, device_id=L40S)
    )
    assert first.lease.address == "0000:41:00.0"
    second = await broker.allocate(
        request(GpuKind.PASSTHROUGH, 101, vendor_id=NVIDIA, device_id=L40S)
    )
    assert second.lease.address == "0000:43:00.0"  # 42:00.0's group is incomplete
    assert second.lease.original_drivers == {"0000:43:00.0": "nvidia"}


async def test_a_container_gets_the_gpu_without_vfio(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    allocation = await broker.allocate(
        request(GpuKind.PASSTHROUGH, 200, lxc=True, address="0000:42:00.0")
    )
    assert allocation.lxd_device == {"type": "gpu", "gputype": "physical", "pci": "0000:42:00.0"}
    assert drivers(node, "0000:42:00.0") == ["nvidia"]
    with pytest.raises(RucherError, match="leased to CT 200"):
        await broker.allocate(request(GpuKind.PASSTHROUGH, 201, lxc=True, address="0000:42:00.0"))


# Mappings ----------------------------------------------------------------------------------------


def mapping(path: str, device: str = L40S, *, mdev: bool = False) -> PciMapping:
    """A mapping of ``path`` on the test node."""
    entry = PciMappingEntry(node=NODE, path=path, vendor_id=NVIDIA, device_id=device)
    return PciMapping(id="gpu-a", map=(entry,), mdev=mdev)


async def test_a_mapping_naming_a_missing_device_is_refused(tmp_path):
    node = synthetic_node(tmp_path)
    node.mappings.items["gpu-a"] = mapping("0000:99:00.0")
    broker = node.broker()
    await broker.reconcile()
    with pytest.raises(RucherError) as refused:
        await broker.allocate(request(GpuKind.PASSTHROUGH, mapping="gpu-a"))
    assert refused.value.code is ErrorCode.INVALID
    assert refused.value.details["field"] == "mapping"
    assert "0000:99:00.0" in refused.value.message
    assert node.kernel.writes == [] and node.store.leases == {}


async def test_a_mapping_leads_to_its_device(tmp_path):
    node = synthetic_node(tmp_path)
    node.mappings.items["gpu-a"] = mapping("0000:43:00.0", mdev=True)
    broker = node.broker()
    await broker.reconcile()
    allocation = await broker.allocate(
        request(GpuKind.MDEV, mapping="gpu-a", mdev_type="nvidia-1156")
    )
    assert allocation.lease.address == "0000:43:00.0"
    node.mappings.items["gpu-a"] = mapping("0000:43:00.0", device="1111")
    with pytest.raises(RucherError, match="hardware changed"):
        await broker.allocate(request(GpuKind.PASSTHROUGH, 101, mapping="gpu-a"))


# Mediated devices --------------------------------------------------------------------------------


async def test_an_mdev_is_created_by_uuid_and_removed_on_release(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    kind = f"{PCI}/0000:43:00.0/mdev_supported_types/nvidia-1155"
    allocation = await broker.allocate(request(GpuKind.MDEV, mdev_type="nvidia-1155"))
    uuid = allocation.lease.mdev_uuid
    assert uuid is not None and node.kernel.mdevs() == [uuid]
    assert node.kernel.read(f"{kind}/available_instances") == "3"
    assert node.kernel.link(f"bus/mdev/devices/{uuid}/mdev_type") == "nvidia-1155"
    assert f"uuid='{uuid}'" in (allocation.libvirt_hostdev or "")
    await broker.release(
        DeviceRelease(command_id="r", vmid=100, reason=ReleaseReason.GUEST_DESTROYED)
    )
    assert node.kernel.mdevs() == [] and node.kernel.read(f"{kind}/available_instances") == "4"


async def test_mdevs_run_out_and_the_next_request_is_refused(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    for vmid in range(100, 102):
        await broker.allocate(request(GpuKind.MDEV, vmid, mdev_type="nvidia-1156"))
    with pytest.raises(RucherError, match="no free instance"):
        await broker.allocate(request(GpuKind.MDEV, 102, mdev_type="nvidia-1156"))
    assert len(node.kernel.mdevs()) == 2 and len(node.store.leases) == 2


async def test_the_kernel_refuses_an_mdev_beyond_available_instances(tmp_path):
    node = synthetic_node(tmp_path)
    kind = f"{PCI}/0000:43:00.0/mdev_supported_types/nvidia-1156"
    for name in ("00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"):
        node.kernel.write(f"{kind}/create", name)
    with pytest.raises(OSError, match="Too many users"):
        node.kernel.write(f"{kind}/create", "00000000-0000-0000-0000-000000000003")
    with pytest.raises(OSError, match="busy"):
        node.kernel.write(f"{PCI}/0000:43:00.0/driver/unbind", "0000:43:00.0")  # mdevs live


# MIG ---------------------------------------------------------------------------------------------


async def test_mig_slices_go_where_large_profiles_stay_possible(tmp_path):
    node = h200_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    small = await broker.allocate(request(GpuKind.MIG, 200, lxc=True, mig_profile="1g.18gb"))
    instance = small.lease.mig_instance
    assert instance is not None and instance.placement.start == 6
    assert small.lxd_device["gputype"] == "mig" and small.lxd_device["mig.gi"] == "1"
    large = await broker.allocate(request(GpuKind.MIG, 201, lxc=True, mig_profile="4g.71gb"))
    assert large.lease.mig_instance is not None and large.lease.mig_instance.placement.start == 0
    calls = list(node.nvml.calls) if node.nvml else []
    with pytest.raises(RucherError, match="no legal free placement") as refused:
        await broker.allocate(request(GpuKind.MIG, 202, lxc=True, mig_profile="7g.141gb"))
    assert refused.value.details["field"] == "mig_profile"
    assert node.nvml is not None and node.nvml.calls == calls  # nothing was tried
    await broker.release(DeviceRelease(command_id="r", vmid=200, reason=ReleaseReason.REQUESTED))
    assert [i.placement.start for i in node.nvml.mig_instances("0000:00:06.0")] == [0]


def test_the_fake_nvml_refuses_what_nvml_refuses(tmp_path):
    node = h200_node(tmp_path)
    assert node.nvml is not None
    half = next(p for p in h200_profiles() if p.name == "3g.71gb")
    with pytest.raises(NvmlError):  # 3g.71gb may only start at slot 0 or 4
        node.nvml.create_gpu_instance(
            "0000:00:06.0", half.profile_id, MigPlacement(start=2, size=4)
        )
    node.nvml.create_gpu_instance("0000:00:06.0", half.profile_id, MigPlacement(start=4, size=4))
    small = next(p for p in h200_profiles() if p.name == "1g.18gb")
    with pytest.raises(NvmlError) as taken:
        node.nvml.create_gpu_instance(
            "0000:00:06.0", small.profile_id, MigPlacement(start=5, size=1)
        )
    assert taken.value.code == NVML_INSUFFICIENT_RESOURCES
    node.kernel.write(f"{PCI}/0000:00:06.0/driver/unbind", "0000:00:06.0")
    assert node.nvml.gpus() == []  # NVML only sees GPUs its driver holds


async def test_a_vm_asking_for_a_mig_slice_is_told_to_use_a_vgpu_type(tmp_path):
    node = h200_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    with pytest.raises(RucherError) as refused:
        await broker.allocate(request(GpuKind.MIG, mig_profile="1g.18gb"))
    assert refused.value.code is ErrorCode.UNSUPPORTED


async def test_random_mig_allocations_and_releases_stay_legal(tmp_path):
    node = h200_node(tmp_path, gpus=3)
    assert node.nvml is not None
    broker = node.broker()
    await broker.reconcile()
    rng = random.Random(11)
    names = [p.name for p in h200_profiles()]
    legal = h200_placements()
    held: list[int] = []
    for step in range(150):
        if held and rng.random() < 0.4:
            vmid = held.pop(rng.randrange(len(held)))
            await broker.release(
                DeviceRelease(command_id=f"r{step}", vmid=vmid, reason=ReleaseReason.REQUESTED)
            )
        else:
            vmid = 1000 + step
            try:
                await broker.allocate(
                    request(GpuKind.MIG, vmid, lxc=True, mig_profile=rng.choice(names))
                )
                held.append(vmid)
            except RucherError as err:
                refusal = err.message
                assert "no legal free placement" in refusal
        for gpu in node.nvml.table.values():
            slots: list[int] = []
            for profile_id, placement, _ in gpu.instances.values():
                assert placement in legal[profile_id]
                slots += range(placement.start, placement.start + placement.size)
            assert len(slots) == len(set(slots)), "overlapping MIG instances"
    leased = sorted(
        (lease.address, lease.mig_instance.gpu_instance_id)
        for lease in node.store.leases.values()
        if lease.mig_instance is not None
    )
    existing = sorted((a, gi) for a, gpu in node.nvml.table.items() for gi in gpu.instances)
    assert leased == existing


async def test_a_refused_mig_profile_means_no_gpu_could_place_it(tmp_path):
    node = h200_node(tmp_path, gpus=2)
    broker = node.broker()
    await broker.reconcile()
    for vmid in (1, 2, 3):
        await broker.allocate(request(GpuKind.MIG, vmid, lxc=True, mig_profile="3g.71gb"))
    with pytest.raises(RucherError):
        await broker.allocate(request(GpuKind.MIG, 4, lxc=True, mig_profile="7g.141gb"))
    geometry = geometry_of(h200_profiles())
    inventory = await broker.inventory()
    for device in inventory.devices:
        seven = next(p for p in device.mig_profiles if p.name == "7g.141gb")
        assert seven.free_placements == ()
        state = sum(
            1 << s
            for i in device.mig_instances
            for s in range(i.placement.start, i.placement.start + i.placement.size)
        )
        assert geometry.capacity(state, geometry.profile("7g.141gb")) == 0


# SR-IOV ------------------------------------------------------------------------------------------


async def test_virtual_functions_are_picked_free_and_bound(tmp_path):
    node = synthetic_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    first = await broker.allocate(request(GpuKind.VF, 100, address="0000:44:00.0"))
    second = await broker.allocate(request(GpuKind.VF, 101, address="0000:44:00.0"))
    assert {first.lease.address, second.lease.address} == {"0000:44:00.4", "0000:44:00.5"}
    assert drivers(node, "0000:44:00.4", "0000:44:00.5", "0000:44:00.0") == [
        "vfio-pci",
        "vfio-pci",
        "nvidia",
    ]
    with pytest.raises(RucherError):
        await broker.allocate(request(GpuKind.VF, 102, address="0000:44:00.0"))


# Restart and reconcile ---------------------------------------------------------------------------


class HangingStore:
    """A lease store whose final records never finish: the broker 'crashes' while recording."""

    def __init__(self, node: FakeNode) -> None:
        self.inner = node.store
        self.writing = asyncio.Event()

    async def load(self):
        return await self.inner.load()

    async def record(self, lease):
        if lease.pending:  # the intent is written; the final record never is
            await self.inner.record(lease)
            return
        self.writing.set()
        await asyncio.Event().wait()

    async def remove(self, lease_id):
        await self.inner.remove(lease_id)


async def _crash_while_recording(node: FakeNode, command: DeviceAllocate) -> None:
    crashed = node.broker()
    store = HangingStore(node)
    crashed.store = store
    await crashed.reconcile()
    task = asyncio.create_task(crashed.allocate(command))
    await asyncio.wait_for(store.writing.wait(), 5)
    # The process dies here: nothing of it runs again (the task is only collected at the end).
    task.cancel()
    crashed.host = None  # type: ignore[assignment]  # a dead process touches the host no more
    with pytest.raises((asyncio.CancelledError, AttributeError)):
        await task


async def test_a_crash_between_mdev_created_and_lease_recorded_leaves_nothing(tmp_path):
    node = synthetic_node(tmp_path)
    await _crash_while_recording(node, request(GpuKind.MDEV, mdev_type="nvidia-1155"))
    assert len(node.kernel.mdevs()) == 1
    assert [lease.pending for lease in node.store.leases.values()] == [True]
    restarted = node.broker()
    await restarted.reconcile()
    assert node.kernel.mdevs() == [] and node.store.leases == {}
    kind = f"{PCI}/0000:43:00.0/mdev_supported_types/nvidia-1155"
    assert node.kernel.read(f"{kind}/available_instances") == "4"


async def test_a_crash_between_bind_and_lease_recorded_gives_the_device_back(tmp_path):
    node = synthetic_node(tmp_path)
    await _crash_while_recording(node, request(GpuKind.PASSTHROUGH, address="0000:41:00.0"))
    assert drivers(node, "0000:41:00.0") == ["vfio-pci"]
    await node.broker().reconcile()
    assert drivers(node, "0000:41:00.0", "0000:41:00.1") == ["nvidia", "snd_hda_intel"]
    assert drivers(node, "0000:45:00.0") == ["vfio-pci"]  # bound at boot by the admin: kept


async def test_a_restart_leaves_alone_what_the_broker_did_not_make(tmp_path):
    node = synthetic_node(tmp_path)
    kind = f"{PCI}/0000:43:00.0/mdev_supported_types/nvidia-1156"
    foreign = "00000000-0000-0000-0000-00000000beef"
    node.kernel.write(f"{kind}/create", foreign)  # made by an operator, not by Rucher
    node.kernel.write(f"{PCI}/0000:42:00.0/driver_override", "vfio-pci")  # e.g. driverctl
    broker = node.broker()
    await broker.reconcile()
    assert node.kernel.mdevs() == [foreign]
    assert node.kernel.read(f"{PCI}/0000:42:00.0/driver_override") == "vfio-pci"
    # The operator's mdev counts: one instance of the type is left, then none.
    await broker.allocate(request(GpuKind.MDEV, 100, mdev_type="nvidia-1156"))
    with pytest.raises(RucherError, match="no free instance"):
        await broker.allocate(request(GpuKind.MDEV, 101, mdev_type="nvidia-1156"))


async def test_a_pending_lease_whose_change_never_happened_is_simply_dropped(tmp_path):
    node = h200_node(tmp_path)
    broker = node.broker()
    await broker.reconcile()
    kept = await broker.allocate(request(GpuKind.MIG, 300, lxc=True, mig_profile="1g.18gb"))
    node.guests.vmids = {300}
    assert kept.lease.mig_instance is not None
    # An intent for the same placement as the kept slice, recorded just before a crash.
    ghost = kept.lease.__class__(
        **{
            **{f: getattr(kept.lease, f) for f in kept.lease.__struct_fields__},
            "lease_id": "ghost",
            "vmid": 301,
            "pending": True,
        }
    )
    await node.store.record(ghost)
    await node.broker().reconcile()
    assert set(node.store.leases) == {kept.lease.lease_id}
    assert node.nvml is not None and len(node.nvml.mig_instances("0000:00:06.0")) == 1


async def test_a_restart_keeps_held_leases_and_frees_those_of_vanished_guests(tmp_path):
    node = h200_node(tmp_path, gpus=2)
    broker = node.broker()
    await broker.reconcile()
    kept = await broker.allocate(request(GpuKind.MIG, 300, lxc=True, mig_profile="3g.71gb"))
    gone = await broker.allocate(request(GpuKind.MIG, 301, lxc=True, mig_profile="3g.71gb"))
    node.guests.vmids = {300}
    node.now += 3600
    restarted = node.broker()
    await restarted.reconcile()
    assert set(node.store.leases) == {kept.lease.lease_id}
    assert (gone.lease.lease_id, ReleaseReason.RECONCILED) in node.events.ended
    assert node.nvml is not None
    instances = [i for a in node.nvml.table for i in node.nvml.mig_instances(a)]
    assert len(instances) == 1
    # The restarted broker never hands the kept slice out again.
    again = await restarted.allocate(request(GpuKind.MIG, 302, lxc=True, mig_profile="3g.71gb"))
    assert again.lease.mig_instance != kept.lease.mig_instance or (
        again.lease.address != kept.lease.address
    )
