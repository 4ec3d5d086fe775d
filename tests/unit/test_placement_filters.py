"""Each filter, over the whole candidate set at once: slices of rows and arrays of rows alike."""

from __future__ import annotations

import numpy as np
import pytest

from rucher.placement import PlacementError, compile_demand
from rucher.placement.filters import (
    FILTERS,
    candidates,
    cpu,
    gpu,
    mdev,
    mig,
    node_affinity,
    online,
    pci_mapping,
    resource_affinity,
    resources,
    storage,
)
from rucher.placement.filters.base import outside
from rucher.proto.cluster import CpuArch
from rucher.proto.gpu import GpuKind, MdevType, PciMapping, PciMappingEntry
from rucher.proto.scheduler import (
    AffinityKind,
    GpuRequest,
    NodeAffinity,
    NodePriority,
    ResourceAffinity,
)

from .test_placement_view import (
    GIB,
    L40,
    NVIDIA,
    capacity,
    held,
    inventory,
    spec,
    view_of,
)
from .test_placement_view import (
    gpu as device,
)
from .test_placement_view import (
    storage as storage_status,
)

NODES = ("n0", "n1", "n2", "n3")
EVERY = slice(0, 4)


def mask(flt, view, demand, nodes=EVERY):
    result = flt.keep(view, demand, nodes)
    return None if result is None else [bool(x) for x in result]


def test_filters_have_unique_names_and_reasons():
    names = [f.name for f in FILTERS]
    assert len(set(names)) == len(names) and all(f.reason for f in FILTERS)


def test_outside_masks_rows_in_slices_and_in_row_arrays():
    rows = np.array([1, 3], dtype=np.intp)
    assert outside(slice(0, 4), rows).tolist() == [True, False, True, False]
    assert outside(slice(2, 4), rows).tolist() == [True, False]
    assert outside(np.array([0, 3, 5], dtype=np.intp), rows).tolist() == [True, False, True]


def test_online_removes_offline_and_maintenance_nodes():
    view = view_of(*NODES)
    view.set_online("n1", False)
    view.set_maintenance("n2", True)
    demand = compile_demand(view, spec())
    assert mask(online.FILTER, view, demand) == [True, False, False, True]
    assert mask(online.FILTER, view, demand, np.array([0, 2])) == [True, False]


def test_resources_need_both_vcpus_and_memory_with_overcommit():
    view = view_of(*NODES, cpus=4, memory=16 * GIB, overcommit=2.0)
    view.reserve("n0", held("a", 201, vcpus=6, memory=GIB))  # 2 of 8 vCPUs left
    view.reserve("n1", held("b", 202, vcpus=1, memory=14 * GIB))  # 2 GiB left
    demand = compile_demand(view, spec(vcpus=3, memory=4 * GIB))
    assert mask(resources.FILTER, view, demand) == [False, False, True, True]


def test_cpu_checks_architecture_only_in_mixed_clusters_and_every_flag():
    view = view_of(*NODES)
    assert mask(cpu.FILTER, view, compile_demand(view, spec())) is None
    view.set_capacity(capacity("n1", arch=CpuArch.AARCH64, flags=("sve",)))
    view.set_capacity(capacity("n2", flags=("avx2", "sse4_2", "avx512f")))
    arm = compile_demand(view, spec(arch=CpuArch.AARCH64))
    assert mask(cpu.FILTER, view, arm) == [False, True, False, False]
    avx512 = compile_demand(view, spec(cpu_flags=("avx512f", "avx2")))
    assert mask(cpu.FILTER, view, avx512) == [False, False, True, False]


def test_storage_needs_every_requested_storage_reachable():
    view = view_of(*NODES)
    view.set_storages("n0", [storage_status("local"), storage_status("ceph")])
    view.set_storages("n1", [storage_status("ceph")])
    view.set_storages("n2", [storage_status("local"), storage_status("ceph", active=False)])
    assert mask(storage.FILTER, view, compile_demand(view, spec())) is None
    demand = compile_demand(view, spec(storages=("ceph", "local")))
    assert mask(storage.FILTER, view, demand) == [True, False, False, False]


def test_gpu_counts_free_devices_of_the_model_and_narrows_to_gpu_nodes():
    view = view_of(*NODES)
    view.set_gpu_inventory(inventory("n1", device("0000:41:00.0"), device("0000:42:00.0")))
    view.set_gpu_inventory(inventory("n2", device("0000:41:00.0", device="2230")))
    view.set_gpu_inventory(inventory("n3", device("0000:41:00.0", lease="x")))
    two_l40 = spec(gpus=(GpuRequest(kind=GpuKind.PASSTHROUGH, device_id=L40, count=2),))
    demand = compile_demand(view, two_l40)
    assert mask(gpu.FILTER, view, demand) == [False, True, False, False]
    any_one = compile_demand(view, spec(gpus=(GpuRequest(kind=GpuKind.PASSTHROUGH),)))
    assert mask(gpu.FILTER, view, any_one) == [False, True, True, False]
    assert gpu.FILTER.narrow(view, any_one).tolist() == [1, 2, 3]
    assert mask(gpu.FILTER, view, compile_demand(view, spec())) is None


def test_mdev_counts_available_instances_of_the_type():
    view = view_of(*NODES)
    vgpu = (MdevType(type_id="nvidia-558", available_instances=2),)
    view.set_gpu_inventory(inventory("n0", device("0000:41:00.0", mdev=vgpu)))
    view.set_gpu_inventory(
        inventory("n2", device("0000:41:00.0", mdev=vgpu), device("0000:42:00.0", mdev=vgpu))
    )
    three = compile_demand(
        view, spec(gpus=(GpuRequest(kind=GpuKind.MDEV, mdev_type="nvidia-558", count=3),))
    )
    assert mask(mdev.FILTER, view, three) == [False, False, True, False]
    assert mdev.FILTER.narrow(view, three).tolist() == [0, 2]


def test_mig_needs_a_free_legal_placement_on_some_gpu():
    view = view_of(*NODES)
    view.set_gpu_inventory(inventory("n0", device("0000:41:00.0", mig=True)))
    view.set_gpu_inventory(
        inventory("n1", device("0000:41:00.0", mig=True, layout=[("1g.18gb", 5)]))
    )
    view.set_gpu_inventory(
        inventory(
            "n2",
            device("0000:41:00.0", mig=True, layout=[("3g.71gb", 0), ("3g.71gb", 4)]),
            device("0000:42:00.0", mig=True, layout=[("4g.71gb", 0)]),
        )
    )
    full = compile_demand(view, spec(gpus=(GpuRequest(kind=GpuKind.MIG, mig_profile="7g.141gb"),)))
    assert mask(mig.FILTER, view, full) == [True, False, False, False]
    half = compile_demand(view, spec(gpus=(GpuRequest(kind=GpuKind.MIG, mig_profile="3g.71gb"),)))
    assert mask(mig.FILTER, view, half) == [True, True, True, False]  # n2: {4} on its 2nd GPU
    three = compile_demand(
        view, spec(gpus=(GpuRequest(kind=GpuKind.MIG, mig_profile="2g.35gb", count=3),))
    )
    assert mask(mig.FILTER, view, three) == [True, False, False, False]  # n1: 2g only at 0 and 2
    assert mig.FILTER.narrow(view, half).tolist() == [0, 1, 2]


def test_pci_mapping_needs_a_free_mapped_device_on_the_node():
    view = view_of(*NODES)
    view.set_gpu_inventory(inventory("n0", device("0000:41:00.0", lease="x")))
    view.set_gpu_inventory(inventory("n1", device("0000:41:00.0")))
    entries = tuple(
        PciMappingEntry(node=node, path="0000:41:00.0", vendor_id=NVIDIA, device_id=L40)
        for node in ("n0", "n1", "n2")
    )
    view.set_mappings([PciMapping(id="gpu0", map=entries)])
    demand = compile_demand(
        view, spec(gpus=(GpuRequest(kind=GpuKind.PASSTHROUGH, mapping="gpu0"),))
    )
    assert mask(pci_mapping.FILTER, view, demand) == [False, True, False, False]
    assert pci_mapping.FILTER.narrow(view, demand).tolist() == [0, 1, 2]


def test_candidates_narrow_to_named_nodes_and_exclusions_mask():
    view = view_of(*NODES)
    demand = compile_demand(view, spec(candidates=("n1", "n2", "gone"), exclude=("n2",)))
    assert candidates.FILTER.narrow(view, demand).tolist() == [1, 2]
    assert mask(candidates.FILTER, view, demand) == [True, True, False, True]


def test_strict_node_affinity_narrows_and_non_strict_does_not():
    view = view_of(*NODES)
    rule = (NodePriority(node="n3", priority=2), NodePriority(node="n1", priority=1))
    strict = compile_demand(view, spec(node_affinity=NodeAffinity(nodes=rule, strict=True)))
    assert node_affinity.FILTER.narrow(view, strict).tolist() == [1, 3]
    loose = compile_demand(view, spec(node_affinity=NodeAffinity(nodes=rule)))
    assert node_affinity.FILTER.narrow(view, loose) is None
    assert mask(node_affinity.FILTER, view, loose) is None


def test_resource_affinity_joins_positive_members_and_avoids_negative_ones():
    view = view_of(*NODES)
    view.reserve("n2", held("a", 201))
    view.reserve("n3", held("b", 202))
    apart = compile_demand(
        view,
        spec(
            resource_affinity=(
                ResourceAffinity(affinity=AffinityKind.NEGATIVE, vmids=(201, 202, 999)),
            )
        ),
    )
    assert mask(resource_affinity.FILTER, view, apart) == [True, True, False, False]
    together = compile_demand(
        view,
        spec(resource_affinity=(ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(202,)),)),
    )
    assert resource_affinity.FILTER.narrow(view, together).tolist() == [3]
    alone = compile_demand(
        view,
        spec(resource_affinity=(ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(999,)),)),
    )
    assert resource_affinity.FILTER.narrow(view, alone) is None  # nobody to join yet


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"memory": 600 * GIB}, "memory", "more than any node has"),
        ({"vcpus": 500}, "vcpus", "more than any node offers"),
        ({"arch": CpuArch.AARCH64}, "arch", "aarch64"),
        ({"cpu_flags": ("amx",)}, "cpu_flags", "amx"),
        ({"storages": ("nfs",)}, "storages", "nfs"),
        ({"gpus": (GpuRequest(kind=GpuKind.MIG, mig_profile="9g.99gb"),)}, "gpus", "9g.99gb"),
        ({"gpus": (GpuRequest(kind=GpuKind.MDEV, mdev_type="nvidia-1"),)}, "gpus", "nvidia-1"),
        ({"gpus": (GpuRequest(kind=GpuKind.PASSTHROUGH, mapping="none"),)}, "gpus", "none"),
        ({"gpus": (GpuRequest(kind=GpuKind.VF, vendor_id="8086"),)}, "gpus", "8086"),
        ({"gpus": (GpuRequest(kind=GpuKind.PASSTHROUGH, count=4),)}, "gpus", "4 devices"),
        (
            {"node_affinity": NodeAffinity(nodes=(NodePriority(node="x"),), strict=True)},
            "node_affinity",
            "none of x",
        ),
        (
            {
                "resource_affinity": (
                    ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(201,)),
                    ResourceAffinity(affinity=AffinityKind.NEGATIVE, vmids=(201,)),
                )
            },
            "resource_affinity",
            "both with and apart",
        ),
        (
            {
                "resource_affinity": (
                    ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(201, 202)),
                )
            },
            "resource_affinity",
            "different nodes",
        ),
        (
            {
                "resource_affinity": (
                    ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(201,)),
                    ResourceAffinity(affinity=AffinityKind.NEGATIVE, vmids=(203,)),
                )
            },
            "resource_affinity",
            "apart from others",
        ),
        (
            {
                "resource_affinity": (
                    ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(201,)),
                ),
                "node_affinity": NodeAffinity(nodes=(NodePriority(node="n1"),), strict=True),
            },
            "resource_affinity",
            "contradict",
        ),
        ({"candidates": ("n1",), "exclude": ("n1",)}, "node_affinity", "contradict"),
    ],
)
def test_impossible_requests_fail_at_once_naming_the_field(options, field, words):
    view = view_of(*NODES, memory=512 * GIB, cpus=64)
    view.set_gpu_inventory(inventory("n1", device("0000:41:00.0"), device("0000:42:00.0")))
    view.reserve("n2", held("a", 201))
    view.reserve("n3", held("b", 202))
    view.reserve("n2", held("c", 203))
    with pytest.raises(PlacementError) as refused:
        compile_demand(view, spec(**options))
    assert refused.value.impossible and refused.value.field == field
    assert words in refused.value.message


def test_an_empty_cluster_is_impossible():
    with pytest.raises(PlacementError, match="no node"):
        compile_demand(view_of(), spec())
