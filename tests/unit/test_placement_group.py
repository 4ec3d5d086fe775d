"""Groups all or nothing, migration targets, and bounded rebalance plans."""

from __future__ import annotations

import numpy as np
import pytest

from rucher.placement import (
    PlacementError,
    imbalance,
    place_group,
    rebalance_plan,
    suggest_migration,
)
from rucher.placement.rebalance import loads
from rucher.proto.cluster import CpuArch
from rucher.proto.gpu import GpuKind
from rucher.proto.scheduler import AffinityKind, GpuRequest, ResourceAffinity

from .test_placement_view import GIB, held, spec, view_of


def snapshot(view):
    return (
        view.vcpu_free[: view.size].copy(),
        view.mem_free[: view.size].copy(),
        dict(view.locations),
        {name: sorted(r.key for r in view.reservations(name)) for name in view.names},
    )


def same(before, after) -> bool:
    return (
        np.array_equal(before[0], after[0])
        and np.array_equal(before[1], after[1])
        and before[2:] == after[2:]
    )


def test_a_group_is_placed_whole_and_leaves_the_view_as_found():
    view = view_of("a", "b", "c", memory=16 * GIB)
    before = snapshot(view)
    decisions = place_group(
        view, [spec(101, memory=12 * GIB), spec(102, memory=12 * GIB), spec(103, memory=12 * GIB)]
    )
    assert [d.demand.vmid for d in decisions] == [101, 102, 103]
    assert len({d.node for d in decisions}) == 3  # each took most of a node
    assert same(before, snapshot(view))


def test_a_group_that_does_not_fit_whole_is_refused_and_nothing_stays_held():
    view = view_of("a", "b", memory=16 * GIB)
    before = snapshot(view)
    with pytest.raises(PlacementError) as refused:
        place_group(
            view,
            [spec(101, memory=12 * GIB), spec(102, memory=12 * GIB), spec(103, memory=12 * GIB)],
        )
    assert not refused.value.impossible and "VM 10" in refused.value.message
    assert same(before, snapshot(view))


def test_positive_members_land_together_where_all_of_them_fit():
    view = view_of("a", "b", memory=16 * GIB)
    view.reserve("a", held("x", 201, memory=6 * GIB))  # a keeps 10 GiB: too little for both
    together = ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(102,))
    decisions = place_group(
        view, [spec(101, memory=6 * GIB, resource_affinity=(together,)), spec(102, memory=6 * GIB)]
    )
    assert [d.node for d in decisions] == ["b", "b"]


def test_negative_members_inside_a_group_are_kept_apart():
    view = view_of("a", "b", "c", memory=64 * GIB)
    view.reserve("c", held("x", 201, memory=60 * GIB))  # c: spread would prefer a and b anyway
    apart = ResourceAffinity(affinity=AffinityKind.NEGATIVE, vmids=(101, 102, 103))
    decisions = place_group(
        view, [spec(vmid, resource_affinity=(apart,)) for vmid in (101, 102, 103)]
    )
    assert sorted(d.node for d in decisions) == ["a", "b", "c"]


def test_together_with_different_architectures_is_impossible():
    view = view_of("a")
    together = ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(102,))
    with pytest.raises(PlacementError) as refused:
        place_group(
            view,
            [spec(101, resource_affinity=(together,)), spec(102, arch=CpuArch.AARCH64)],
        )
    assert refused.value.impossible


def test_a_group_naming_a_guest_twice_is_refused():
    with pytest.raises(PlacementError, match="twice"):
        place_group(view_of("a"), [spec(101), spec(101)])


def test_a_migration_target_is_never_the_source():
    view = view_of("a", "b", "c")
    view.reserve("b", held("x", 201, memory=100 * GIB))
    view.reserve("a", held("vm", 101))
    decision = suggest_migration(view, spec(101), "a")
    assert decision.node == "c"
    with pytest.raises(PlacementError):
        suggest_migration(view, spec(101, candidates=("a",)), "a")


def _unbalanced():
    view = view_of("a", "b", "c", "d", cpus=32, memory=64 * GIB)
    for n in range(6):
        view.reserve("a", held(f"a{n}", 300 + n, vcpus=4, memory=8 * GIB))
    view.reserve("b", held("b0", 320, vcpus=4, memory=8 * GIB))
    view.reserve(
        "a", held("gpu", 330, memory=8 * GIB, gpus=(GpuRequest(kind=GpuKind.PASSTHROUGH),))
    )
    return view


def test_a_rebalance_plan_lowers_imbalance_move_by_move_and_is_bounded():
    view = _unbalanced()
    before = snapshot(view)
    plan = rebalance_plan(view, max_moves=3)
    assert 0 < len(plan.moves) <= 3
    assert plan.imbalance_after < plan.imbalance_before
    assert plan.imbalance_before == pytest.approx(imbalance(loads(view, view.live())))
    assert all(move.source == "a" and move.gain > 0 for move in plan.moves)
    assert all(move.vmid != 330 for move in plan.moves)  # a guest with a device stays
    assert same(before, snapshot(view))
    assert len(rebalance_plan(view, max_moves=50).moves) < 50  # stops once nothing gains


def test_a_balanced_cluster_needs_no_moves_and_a_subset_can_be_balanced_alone():
    view = view_of("a", "b")
    view.reserve("a", held("x", 201, memory=8 * GIB))
    view.reserve("b", held("y", 202, memory=8 * GIB))
    assert rebalance_plan(view, max_moves=5).moves == ()
    unbalanced = _unbalanced()
    plan = rebalance_plan(unbalanced, max_moves=5, nodes=("a", "b"))
    assert plan.moves and all(move.target == "b" for move in plan.moves)


def test_imbalance_is_zero_when_even_and_one_when_everything_is_on_one_node():
    assert imbalance(np.array([0.5, 0.5, 0.5])) == 0.0
    assert imbalance(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert imbalance(np.array([0.3])) == 0.0
