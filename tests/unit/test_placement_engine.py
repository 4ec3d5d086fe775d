"""The placement engine: explanations, windows on large clusters, tiers, ties, impossibility."""

from __future__ import annotations

import pytest

from rucher.placement import Options, PlacementError, place
from rucher.proto.gpu import GpuKind
from rucher.proto.scheduler import (
    AffinityKind,
    GpuRequest,
    NodeAffinity,
    NodePriority,
    ResourceAffinity,
)

from .test_placement_view import GIB, capacity, gpu, held, inventory, spec, storage, view_of


def test_a_refusal_says_which_filter_removed_how_many_nodes():
    view = view_of(*(f"n{i}" for i in range(10)), memory=16 * GIB)
    view.set_online("n0", False)
    for i in range(1, 8):
        view.reserve(f"n{i}", held(f"x{i}", 200 + i, memory=15 * GIB))
    for i in (8, 9):
        view.set_storages(f"n{i}", [storage("local")])
    view.set_storages("n1", [storage("ceph")])
    with pytest.raises(PlacementError) as refused:
        place(view, spec(memory=4 * GIB, storages=("ceph",)))
    error = refused.value
    assert not error.impossible and error.examined == 10
    counts = {o.filter: (o.removed, o.remaining) for o in error.outcomes}
    assert counts == {"online": (1, 9), "resources": (7, 2), "storage": (2, 0)}
    assert "online removed 1" in error.message and "storage removed 2" in error.message
    assert error.details()["filters"][1] == {"filter": "resources", "removed": 7, "remaining": 2}


def test_a_decision_explains_itself_too():
    view = view_of("a", "b", "c")
    view.set_maintenance("a", True)
    decision = place(view, spec(exclude=("b",)))
    assert decision.node == "c" and decision.examined == 3
    assert [(o.filter, o.removed) for o in decision.outcomes] == [
        ("online", 1),
        ("candidates", 1),
        ("resources", 0),
    ]


def test_equal_nodes_are_chosen_by_name_for_reproducible_decisions():
    view = view_of("n3", "n10", "n2")
    assert place(view, spec()).node == "n10"  # "n10" < "n2" < "n3", as Proxmox sorts


def test_a_large_cluster_is_sampled_but_a_refusal_examines_every_node():
    view = view_of(*(f"n{i:05}" for i in range(5000)), memory=64 * GIB)
    options = Options(window=256, enough=32)
    decision = place(view, spec(vmid=4242), options=options)
    assert decision.examined == 256  # one window had enough feasible nodes
    view.reserve(decision.row, held("x", 4242))
    elsewhere = place(view, spec(vmid=4243), options=options)
    assert elsewhere.row // 256 != decision.row // 256  # the start window moves with the VMID
    with pytest.raises(PlacementError) as refused:
        place(view, spec(memory=64 * GIB + 1), options=options)
    assert refused.value.impossible  # larger than any node: no scan at all
    view.reserve(decision.row, held("y", 5000, memory=40 * GIB))
    with pytest.raises(PlacementError) as full:
        place(view, spec(memory=64 * GIB, candidates=(decision.node,)), options=options)
    assert full.value.examined == 1


def test_nodes_that_left_are_never_chosen_nor_counted():
    view = view_of(*(f"n{i}" for i in range(40)))
    for i in range(39):
        view.remove_node(f"n{i}")
    decision = place(view, spec(), options=Options(window=8, enough=1))
    assert decision.node == "n39" and decision.examined == 1


def test_non_strict_affinity_prefers_its_nodes_then_falls_back_to_others():
    view = view_of("a", "b", "c", memory=8 * GIB)
    rule = NodeAffinity(
        nodes=(NodePriority(node="b", priority=2), NodePriority(node="c", priority=1))
    )
    assert place(view, spec(node_affinity=rule)).node == "b"
    view.reserve("b", held("x", 201, memory=8 * GIB))
    assert place(view, spec(node_affinity=rule)).node == "c"
    view.reserve("c", held("y", 202, memory=8 * GIB))
    assert place(view, spec(node_affinity=rule)).node == "a"
    strict = NodeAffinity(nodes=rule.nodes, strict=True)
    with pytest.raises(PlacementError) as refused:
        place(view, spec(node_affinity=strict))
    assert not refused.value.impossible
    assert refused.value.outcomes[0].filter == "node-affinity"
    assert refused.value.outcomes[0].removed == 1


def test_non_strict_affinity_falls_back_on_a_windowed_cluster_too():
    view = view_of(*(f"n{i:03}" for i in range(300)), memory=8 * GIB)
    view.reserve("n150", held("x", 201, memory=8 * GIB))
    rule = NodeAffinity(nodes=(NodePriority(node="n150"),))
    decision = place(view, spec(node_affinity=rule), options=Options(window=64, enough=8))
    assert decision.node != "n150"


def test_resource_affinity_keeps_guests_together_and_apart():
    view = view_of("a", "b", "c")
    view.reserve("b", held("x", 201))
    together = ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(201,))
    apart = ResourceAffinity(affinity=AffinityKind.NEGATIVE, vmids=(201,))
    assert place(view, spec(resource_affinity=(together,))).node == "b"
    assert place(view, spec(resource_affinity=(apart,))).node in {"a", "c"}
    view.reserve("b", held("fill", 202, memory=127 * GIB))
    with pytest.raises(PlacementError) as refused:
        place(view, spec(resource_affinity=(together,)))
    assert [o.filter for o in refused.value.outcomes][:2] == ["resource-affinity", "online"]


def test_gpu_requests_scan_only_gpu_nodes():
    view = view_of(*(f"n{i:03}" for i in range(200)))
    view.set_gpu_inventory(inventory("n117", gpu("0000:41:00.0", mig=True)))
    mig = spec(gpus=(GpuRequest(kind=GpuKind.MIG, mig_profile="3g.71gb", count=2),))
    decision = place(view, mig, options=Options(window=16, enough=4))
    assert decision.node == "n117" and decision.examined == 1
    assert decision.outcomes[0].filter == "mig" and decision.outcomes[0].removed == 199
    view.reserve(decision.row, held("m", 300, gpus=mig.resources.gpus))
    with pytest.raises(PlacementError, match="mig removed 1"):
        place(view, spec(gpus=(GpuRequest(kind=GpuKind.MIG, mig_profile="1g.18gb"),)))


def test_options_weights_switch_weighers_off():
    view = view_of("a", "b")
    view.set_capacity(capacity("a", load=0.0))
    view.set_capacity(capacity("b", load=1.0))
    view.reserve("a", held("x", 201, memory=64 * GIB))
    assert place(view, spec(), options=Options(weights={"spread": 1.0})).node == "b"
    assert place(view, spec(), options=Options(weights={"load": 1.0})).node == "a"
