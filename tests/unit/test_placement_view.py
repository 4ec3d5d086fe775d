"""The columnar cluster view: rows derived from what agents publish minus what is reserved."""

from __future__ import annotations

import numpy as np
import pytest

from rucher.placement import ClusterView, Reservation
from rucher.placement.mig import NO_GPU
from rucher.proto.cluster import CpuArch, NodeCapacity
from rucher.proto.gpu import (
    GpuInventory,
    GpuKind,
    MdevType,
    PciDevice,
    PciMapping,
    PciMappingEntry,
)
from rucher.proto.guest import GuestType
from rucher.proto.scheduler import GpuRequest, PlacementSpec, ResourceRequest
from rucher.proto.storage import StorageStatus, StorageType

from .test_placement_mig import h200_instances, h200_profiles

GIB = 1 << 30
NVIDIA, H200_ID, L40 = "10de", "2335", "26b5"


def capacity(
    node: str,
    *,
    cpus: int = 32,
    memory: int = 128 * GIB,
    arch: CpuArch = CpuArch.X86_64,
    flags: tuple[str, ...] = ("avx2", "sse4_2"),
    load: float = 0.0,
    used: int = 0,
) -> NodeCapacity:
    return NodeCapacity(
        node=node,
        arch=arch,
        cpu_model="test",
        cpus=cpus,
        sockets=1,
        memory_total=memory,
        memory_used=used,
        time=0.0,
        cpu_flags=flags,
        cpu_usage=load,
    )


def storage(name: str, *, active: bool = True) -> StorageStatus:
    return StorageStatus(
        storage=name,
        storage_type=StorageType.DIR,
        content=(),
        shared=False,
        active=active,
        enabled=True,
    )


def gpu(
    address: str,
    *,
    device: str = L40,
    lease: str | None = None,
    mdev: tuple[MdevType, ...] = (),
    mig: bool = False,
    layout: list[tuple[str, int]] | None = None,
    physfn: str | None = None,
) -> PciDevice:
    return PciDevice(
        address=address,
        vendor_id=NVIDIA,
        device_id=H200_ID if mig else device,
        class_code="030200",
        lease_id=lease,
        mdev_types=mdev,
        mig_enabled=mig,
        mig_profiles=h200_profiles() if mig else (),
        mig_instances=h200_instances(layout or []) if mig else (),
        physfn=physfn,
    )


def inventory(node: str, *devices: PciDevice, claims: tuple[str, ...] = ()) -> GpuInventory:
    return GpuInventory(node=node, devices=devices, time=0.0, claims=claims)


def view_of(*nodes: str, overcommit: float = 1.0, **options: object) -> ClusterView:
    view = ClusterView(cpu_overcommit=overcommit)
    for node in nodes:
        view.set_capacity(capacity(node, **options))  # type: ignore[arg-type]
        view.set_online(node, True)
    return view


def request(vcpus: int = 1, memory: int = GIB, **options: object) -> ResourceRequest:
    return ResourceRequest(vcpus=vcpus, memory=memory, **options)  # type: ignore[arg-type]


def spec(vmid: int = 100, vcpus: int = 1, memory: int = GIB, **options: object) -> PlacementSpec:
    fields = {k: options.pop(k) for k in list(options) if k in PlacementSpec.__struct_fields__}
    return PlacementSpec(
        vmid=vmid,
        guest_type=GuestType.QEMU,
        resources=request(vcpus, memory, **options),
        **fields,  # type: ignore[arg-type]
    )


def held(key: str, vmid: int, vcpus: int = 1, memory: int = GIB, **options: object) -> Reservation:
    return Reservation(key=key, vmid=vmid, resources=request(vcpus, memory, **options))


def test_capacity_sets_one_row_and_applies_the_overcommit_ratio():
    view = view_of("n1", "n2", overcommit=4.0, cpus=8, memory=64 * GIB)
    row = view.index["n2"]
    assert view.vcpu_total[row] == 32.0 and view.vcpu_free[row] == 32.0
    assert view.mem_free[row] == 64 * GIB
    assert view.present_count() == 2 and bool(view.schedulable[row])


def test_a_node_is_schedulable_only_online_present_and_out_of_maintenance():
    view = ClusterView()
    view.set_online("n1", True)
    assert not view.schedulable[view.index["n1"]]  # no capacity known yet
    view.set_capacity(capacity("n1"))
    assert view.schedulable[view.index["n1"]]
    view.set_maintenance("n1", True)
    assert not view.schedulable[view.index["n1"]]
    view.set_maintenance("n1", False)
    view.set_online("n1", False)
    assert not view.schedulable[view.index["n1"]]


def test_rows_grow_past_the_initial_allocation_and_keep_their_values():
    view = view_of(*(f"n{i}" for i in range(100)), memory=8 * GIB)
    view.reserve("n3", held("a", 200, memory=GIB))
    assert view.size == 100 and len(view.present) >= 100
    assert view.mem_free[view.index["n3"]] == 7 * GIB
    assert view.mem_free[view.index["n99"]] == 8 * GIB


def test_reservations_add_up_and_release_restores_the_row():
    view = view_of("n1", cpus=16, memory=32 * GIB)
    row = view.index["n1"]
    view.reserve("n1", held("a", 101, vcpus=4, memory=8 * GIB))
    view.reserve(row, held("b", 102, vcpus=2, memory=4 * GIB))
    assert view.vcpu_free[row] == 10 and view.mem_free[row] == 20 * GIB
    assert view.guests[row] == 2 and view.locations == {101: row, 102: row}
    with pytest.raises(ValueError, match="already held"):
        view.reserve(row, held("a", 101))
    released = view.release("n1", "a")
    assert released is not None and released.vmid == 101
    assert view.vcpu_free[row] == 14 and view.mem_free[row] == 28 * GIB
    assert view.locations == {102: row}
    assert view.release("n1", "a") is None and view.release("nowhere", "b") is None


def test_set_reservations_replaces_everything_held_on_the_node():
    view = view_of("n1", "n2")
    view.reserve("n1", held("a", 101, memory=2 * GIB))
    view.set_reservations("n1", [held("b", 102, memory=3 * GIB), held("c", 103)])
    row = view.index["n1"]
    assert view.mem_free[row] == 124 * GIB
    assert {r.key for r in view.reservations("n1")} == {"b", "c"}
    assert 101 not in view.locations and view.locations[103] == row


def test_storages_count_only_when_active_and_enabled():
    view = view_of("n1")
    view.set_storages("n1", [storage("local"), storage("ceph", active=False)])
    row = view.index["n1"]
    assert view.storage_ids.get("ceph") is not None
    local, ceph = view.storage_ids.index["local"], view.storage_ids.index["ceph"]
    bits = int(view.storage[row, 0])
    assert bits & (1 << local) and not bits & (1 << ceph)


def test_more_than_64_cpu_flags_widen_the_bitset():
    flags = tuple(f"flag{i}" for i in range(70))
    view = view_of("n1", flags=flags)
    assert view.cpu_flags.shape[1] == 2
    assert int(view.cpu_flags[view.index["n1"], 1]) == (1 << 6) - 1


def test_gpu_inventory_fills_devices_mdev_and_mig_columns():
    view = view_of("n1")
    view.set_gpu_inventory(
        inventory(
            "n1",
            gpu("0000:41:00.0"),
            gpu("0000:42:00.0", lease="lease-1"),
            gpu("0000:43:00.0", mdev=(MdevType(type_id="nvidia-1", available_instances=4),)),
            gpu("0000:44:00.0", mig=True, layout=[("3g.71gb", 4)]),
            gpu("0000:45:00.1", physfn="0000:43:00.0"),
        )
    )
    row, rows = view.index["n1"], view.gpu
    any_gpu = rows.devices.index[("passthrough", "*", "*")]
    l40 = rows.devices.index[("passthrough", NVIDIA, L40)]
    assert rows.dev_total[row, any_gpu] == 3 and rows.dev_free[row, any_gpu] == 2
    assert rows.dev_free[row, l40] == 2
    assert ("passthrough", NVIDIA, H200_ID) not in rows.devices  # MIG GPUs are not given whole
    assert rows.dev_free[row, rows.devices.index[("vf", "*", "*")]] == 1
    assert rows.mdev_free[row, rows.mdev_types.index["nvidia-1"]] == 4
    codes = view.mig_codes(row)
    assert len(codes) == 1
    _geometry, state = view.mig.decode(codes[0])
    assert state & 0xFF == 0xF0 and bool(rows.has_gpu[row])


def test_pending_gpu_claims_are_taken_from_the_row_until_the_inventory_shows_them():
    view = view_of("n1")
    view.set_gpu_inventory(
        inventory(
            "n1",
            gpu("0000:41:00.0"),
            gpu("0000:43:00.0", mdev=(MdevType(type_id="nvidia-1", available_instances=2),)),
            gpu("0000:44:00.0", mig=True),
        )
    )
    row, rows = view.index["n1"], view.gpu
    claim = held(
        "c1",
        101,
        gpus=(
            GpuRequest(kind=GpuKind.PASSTHROUGH),
            GpuRequest(kind=GpuKind.MDEV, mdev_type="nvidia-1"),
            GpuRequest(kind=GpuKind.MIG, mig_profile="1g.18gb"),
        ),
    )
    any_gpu = rows.devices.index[("passthrough", "*", "*")]
    assert rows.dev_free[row, any_gpu] == 2  # the mdev-capable GPU can also go whole
    view.reserve("n1", claim)
    assert rows.dev_free[row, any_gpu] == 1
    assert rows.mdev_free[row, rows.mdev_types.index["nvidia-1"]] == 1
    _, state = view.mig.decode(view.mig_codes(row)[0])
    assert state == 1 << 6  # the 1g slice went to the last slot
    # Once the broker's inventory shows the claim, it must not be counted twice.
    view.set_reservations("n1", [Reservation(**{**_fields(claim), "gpu_applied": True})])
    assert rows.dev_free[row, any_gpu] == 2
    assert view.mem_free[row] == 127 * GIB
    view.release("n1", "c1")
    assert rows.dev_free[row, any_gpu] == 2 and view.mem_free[row] == 128 * GIB


def _fields(reservation: Reservation) -> dict[str, object]:
    return {name: getattr(reservation, name) for name in reservation.__slots__}


def test_mapping_columns_count_free_mapped_devices_per_node():
    view = view_of("n1", "n2")
    view.set_gpu_inventory(inventory("n1", gpu("0000:41:00.0"), gpu("0000:42:00.0", lease="x")))
    entry = {"vendor_id": NVIDIA, "device_id": L40}
    view.set_mappings(
        [
            PciMapping(
                id="gpu0",
                map=(
                    PciMappingEntry(node="n1", path="0000:41:00.0", **entry),
                    PciMappingEntry(node="n1", path="0000:42:00.0", **entry),
                    PciMappingEntry(node="n2", path="0000:41:00.0", **entry),
                ),
            )
        ]
    )
    column = view.gpu.mapping_ids.index["gpu0"]
    n1, n2 = view.index["n1"], view.index["n2"]
    assert view.gpu.map_total[n1, column] == 2 and view.gpu.map_free[n1, column] == 1
    assert view.gpu.map_total[n2, column] == 1 and view.gpu.map_free[n2, column] == 0


def test_removing_a_node_empties_its_row_and_forgets_its_guests():
    view = view_of("n1", "n2")
    view.reserve("n1", held("a", 101))
    view.set_gpu_inventory(inventory("n1", gpu("0000:41:00.0", mig=True)))
    view.remove_node("n1")
    row = view.index["n1"]
    assert not view.present[row] and not view.schedulable[row]
    assert view.present_count() == 1 and 101 not in view.locations
    assert (view.gpu.mig[row] == NO_GPU).all() and not view.gpu.has_gpu[row]
    assert np.array_equal(view.live(), [view.index["n2"]])


def test_largest_follows_capacity_changes():
    view = view_of("n1", "n2", memory=64 * GIB)
    assert view.largest("mem_total") == 64 * GIB
    view.set_capacity(capacity("n2", memory=256 * GIB))
    assert view.largest("mem_total") == 256 * GIB
    view.remove_node("n2")
    assert view.largest("mem_total") == 64 * GIB


def test_the_overcommit_ratio_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        ClusterView(cpu_overcommit=0)


def test_overcommitted_flags_a_node_holding_more_than_it_has():
    view = view_of("n1", cpus=4, memory=8 * GIB)
    view.set_gpu_inventory(inventory("n1", gpu("0000:41:00.0", mig=True)))
    view.reserve("n1", held("a", 101, vcpus=4, memory=8 * GIB))
    assert not view.overcommitted("n1")
    view.reserve("n1", held("b", 102, memory=1))
    assert view.overcommitted("n1")
    view.release("n1", "b")
    big = (GpuRequest(kind=GpuKind.MIG, mig_profile="7g.141gb"),)
    view.reserve("n1", held("c", 103, vcpus=1, memory=0, gpus=big))
    assert view.overcommitted("n1")  # vCPUs: 5 of 4
    view.release("n1", "c")
    view.release("n1", "a")
    view.reserve("n1", held("d", 104, gpus=big))
    assert not view.overcommitted("n1")
    view.reserve("n1", held("e", 105, gpus=big))  # no second 7g on one H200
    assert view.overcommitted("n1")
    view.set_reservations("n1", [held("d", 104, gpus=big)])
    assert not view.overcommitted("n1")


def test_holds_looks_only_at_what_the_reservation_uses():
    view = view_of("n1", memory=8 * GIB)
    view.set_gpu_inventory(inventory("n1", gpu("0000:41:00.0"), gpu("0000:44:00.0", mig=True)))
    whole = (GpuRequest(kind=GpuKind.PASSTHROUGH),)
    view.reserve("n1", held("a", 101, gpus=whole))
    view.reserve("n1", held("b", 102, gpus=whole))  # one GPU, two claims on it
    view.reserve("n1", held("c", 103))
    assert view.overcommitted("n1")
    assert view.holds("n1", "c") and not view.holds("n1", "b")
    mig = (GpuRequest(kind=GpuKind.MIG, mig_profile="7g.141gb"),)
    view.reserve("n1", held("d", 104, gpus=mig))
    view.reserve("n1", held("e", 105, gpus=mig))
    assert view.holds("n1", "d") and not view.holds("n1", "e")
    view.reserve("n1", held("f", 106, memory=8 * GIB))
    assert not view.holds("n1", "c") and not view.holds("n1", "missing")


def test_a_mapped_device_claim_takes_the_mapping_and_a_device_of_its_model():
    view = view_of("n1", "n2")
    view.set_gpu_inventory(inventory("n1", gpu("0000:41:00.0"), gpu("0000:42:00.0", device="2230")))
    entry = PciMappingEntry(node="n1", path="0000:42:00.0", vendor_id=NVIDIA, device_id="2230")
    view.set_mappings([PciMapping(id="a6000", map=(entry,))])
    rows, row = view.gpu, view.index["n1"]
    column = rows.mapping_ids.index["a6000"]
    a6000 = rows.devices.index[("passthrough", NVIDIA, "2230")]
    l40 = rows.devices.index[("passthrough", NVIDIA, L40)]
    request = (GpuRequest(kind=GpuKind.PASSTHROUGH, mapping="a6000"),)
    view.reserve("n1", held("a", 101, gpus=request))
    assert rows.map_free[row, column] == 0
    assert rows.dev_free[row, a6000] == 0 and rows.dev_free[row, l40] == 1
    view.set_mappings([])  # the mapping was deleted: its column empties on the nodes it named
    assert rows.map_total[row, column] == 0
