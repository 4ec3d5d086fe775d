"""Each weigher, and Proxmox's own CRS expectations for the static and basic modes."""

from __future__ import annotations

import numpy as np
import pytest

from rucher.placement import Options, compile_demand, place
from rucher.placement.topsis import topsis
from rucher.placement.weighers import WEIGHERS, affinity, crs, fragmentation, load, spread
from rucher.proto.gpu import GpuKind
from rucher.proto.scheduler import (
    CrsMode,
    GpuRequest,
    NodeAffinity,
    NodePriority,
    PlacementPolicy,
    PlacementStrategy,
)

from .test_placement_view import GIB, capacity, gpu, held, inventory, spec, view_of

SPREAD = PlacementPolicy()
PACK = PlacementPolicy(strategy=PlacementStrategy.PACK)
ONLY = Options(weights={})  # no weigher but the one under test


def rows(*indexes: int) -> np.ndarray:
    return np.array(indexes, dtype=np.intp)


def ranked(names: list[str], scores: np.ndarray) -> list[str]:
    """Nodes best first, ties by name: how Proxmox's HA manager orders them."""
    return [name for _, name in sorted(zip(-scores, names, strict=True))]


def test_weighers_have_unique_names():
    assert len({w.name for w in WEIGHERS}) == len(WEIGHERS)


def test_spread_prefers_room_left_and_pack_the_fullest_node_that_fits():
    view = view_of("a", "b", "c", cpus=16, memory=64 * GIB)
    view.reserve("a", held("x", 201, vcpus=8, memory=32 * GIB))
    view.reserve("b", held("y", 202, vcpus=14, memory=60 * GIB))
    demand = compile_demand(view, spec(vcpus=2, memory=4 * GIB))
    room = spread.score(view, demand, rows(0, 1, 2), SPREAD)
    assert room.argmax() == 2 and room.argmin() == 1
    assert np.allclose(spread.score(view, demand, rows(0, 1, 2), PACK), 1.0 - room)
    assert place(view, spec(vcpus=2, memory=4 * GIB), PACK).node == "b"
    assert place(view, spec(vcpus=2, memory=4 * GIB), SPREAD).node == "c"


def test_load_prefers_idle_cpus():
    view = view_of("a", "b")
    view.set_capacity(capacity("a", load=0.9))
    view.set_capacity(capacity("b", load=0.1))
    demand = compile_demand(view, spec())
    assert load.score(view, demand, rows(0, 1), SPREAD).tolist() == pytest.approx([0.1, 0.9])
    assert place(view, spec(), options=Options(weights={"load": 1.0})).node == "b"


def test_fragmentation_prefers_a_cut_up_gpu_for_a_small_mig_slice():
    view = view_of("empty", "cut")
    view.set_gpu_inventory(inventory("empty", gpu("0000:41:00.0", mig=True)))
    view.set_gpu_inventory(inventory("cut", gpu("0000:41:00.0", mig=True, layout=[("4g.71gb", 0)])))
    small = spec(gpus=(GpuRequest(kind=GpuKind.MIG, mig_profile="1g.18gb"),))
    scores = fragmentation.score(view, compile_demand(view, small), rows(0, 1), SPREAD)
    assert scores.tolist() == [0.0, 1.0]
    assert place(view, small, options=Options(weights={"fragmentation": 1.0})).node == "cut"


def test_guests_without_gpus_keep_off_gpu_nodes():
    view = view_of("gpu", "plain")
    view.set_gpu_inventory(inventory("gpu", gpu("0000:41:00.0")))
    demand = compile_demand(view, spec())
    assert fragmentation.score(view, demand, rows(0, 1), SPREAD).tolist() == [0.0, 1.0]
    whole = compile_demand(view, spec(gpus=(GpuRequest(kind=GpuKind.PASSTHROUGH),)))
    assert fragmentation.score(view, whole, rows(0), SPREAD) is None


def test_affinity_priority_dominates_every_other_weigher():
    view = view_of("a", "b", "c", memory=64 * GIB)
    view.reserve("c", held("x", 201, memory=60 * GIB))  # c is nearly full
    rule = NodeAffinity(nodes=(NodePriority(node="c", priority=5), NodePriority(node="b")))
    demand = compile_demand(view, spec(node_affinity=rule))
    assert affinity.score(view, demand, rows(0, 1, 2), SPREAD).tolist() == [-1.0, 0.0, 5.0]
    assert place(view, spec(node_affinity=rule)).node == "c"
    assert affinity.score(view, compile_demand(view, spec()), rows(0), SPREAD) is None


def test_basic_crs_prefers_fewest_guests():
    view = view_of("a", "b", "c")
    for n in range(3):
        view.reserve("a", held(f"a{n}", 300 + n))
    view.reserve("b", held("b0", 310))
    policy = PlacementPolicy(crs=CrsMode.BASIC)
    scores = crs.score(view, compile_demand(view, spec()), rows(0, 1, 2), policy)
    assert ranked(["a", "b", "c"], scores) == ["c", "b", "a"]
    assert crs.score(view, compile_demand(view, spec()), rows(0), SPREAD) is None


def test_topsis_scores_the_ideal_best_one_and_the_ideal_worst_zero():
    matrix = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    scores = topsis(matrix, np.array([-1.0, -3.0]))
    assert scores[0] == pytest.approx(1.0) and scores[2] == pytest.approx(0.0)
    assert 0.0 < scores[1] < 1.0
    assert topsis(np.ones((3, 2)), np.array([1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]


class StaticNodes:
    """Proxmox's static usage bookkeeping, to replay its own scheduling tests."""

    def __init__(self, nodes: dict[str, tuple[int, int]]) -> None:
        self.nodes = {
            name: [0.0, float(cpus), 0.0, float(mem)] for name, (cpus, mem) in nodes.items()
        }
        self.services: dict[str, tuple[str, float, float]] = {}

    def add(self, node: str, sid: str, cpu: float, mem: float) -> None:
        self.nodes[node][0] += cpu
        self.nodes[node][2] += mem
        self.services[sid] = (node, cpu, mem)

    def remove(self, sid: str) -> None:
        node, cpu, mem = self.services.pop(sid)
        self.nodes[node][0] -= cpu
        self.nodes[node][2] -= mem

    def order(self, cpu: float, mem: float) -> list[str]:
        names = sorted(self.nodes)
        columns = np.array([self.nodes[name] for name in names])
        scores = crs.static_scores(
            columns[:, 0], columns[:, 1], mem=columns[:, 2], maxmem=columns[:, 3],
            guest_cpu=cpu, guest_mem=mem,
        )  # fmt: skip
        return ranked(names, scores)


def test_static_crs_balances_as_proxmox_does():
    nodes = StaticNodes({"A": (10, 100_000_000_000), "B": (20, 200_000_000_000)})
    for i in range(15):
        order = nodes.order(4, 20_000_000_000)
        assert order == (["A", "B"] if i % 3 == 2 else ["B", "A"]), i
        nodes.add(order[0], f"vm:{100 + i}", 4, 20_000_000_000)


def test_static_crs_after_removals_as_proxmox_does():
    gb20 = 20_000_000_000
    nodes = StaticNodes(
        {"A": (10, 100_000_000_000), "B": (20, 200_000_000_000), "C": (30, 300_000_000_000)}
    )
    for node, sid in (("A", "a"), ("A", "b"), ("B", "c"), ("B", "d"), ("C", "e")):
        nodes.add(node, sid, 4, gb20)
    assert nodes.order(4, gb20) == ["C", "B", "A"]
    nodes.remove("d")
    nodes.remove("c")
    nodes.add("C", "c", 4, gb20)
    assert nodes.order(4, gb20) == ["B", "C", "A"]


def test_static_crs_on_an_overcommitted_cluster_as_proxmox_does():
    nodes = StaticNodes(
        {
            "A": (4, 4_102_062_080),
            "B": (4, 4_102_062_080),
            "C": (4, 4_102_053_888),
            "D": (4, 4_102_053_888),
        }
    )
    for node, sid in (("A", "a"), ("A", "b"), ("A", "c"), ("B", "d"), ("A", "e")):
        nodes.add(node, sid, 1, 536_870_912)
    assert nodes.order(1, 536_870_912) == ["C", "D", "B", "A"]


@pytest.mark.parametrize("start_load", [True, False])
def test_static_crs_with_small_memory_differences_as_proxmox_does(start_load):
    nodes = StaticNodes(
        {"A": (8, 10_000_000_000), "B": (4, 9_000_000_000), "C": (4, 8_000_000_000)}
    )
    if start_load:
        nodes.add("A", "vm:100", 4, 1_000_000_000)
        nodes.add("B", "vm:101", 2, 1_000_000_000)
        nodes.add("C", "vm:102", 2, 1_000_000_000)
    expected = {0: ["A", "B", "C"], 1: ["A", "B", "C"], 2: ["B", "C", "A"], 3: ["C", "A", "B"]}
    for i in range(20):
        order = nodes.order(3, 16_000_000)
        assert order == expected[i % 4], i
        nodes.add(order[0], f"vm:{103 + i}", 3, 16_000_000)


def test_place_with_static_crs_follows_the_same_sequence():
    view = view_of("B", "A", overcommit=4.0, memory=0)
    view.set_capacity(capacity("A", cpus=10, memory=100_000_000_000))
    view.set_capacity(capacity("B", cpus=20, memory=200_000_000_000))
    policy = PlacementPolicy(crs=CrsMode.STATIC)
    for i in range(15):
        guest = spec(vmid=100 + i, vcpus=4, memory=20_000_000_000)
        decision = place(view, guest, policy)
        assert decision.node == ("A" if i % 3 == 2 else "B"), i
        view.reserve(decision.row, held(f"vm{i}", 100 + i, vcpus=4, memory=20_000_000_000))


def test_dynamic_crs_reads_measured_usage():
    view = view_of("a", "b", memory=100 * GIB)
    view.set_capacity(capacity("a", memory=100 * GIB, load=0.8, used=80 * GIB))
    view.set_capacity(capacity("b", memory=100 * GIB, load=0.1, used=10 * GIB))
    view.reserve("b", held("x", 201, vcpus=30, memory=80 * GIB))  # configured, not measured
    policy = PlacementPolicy(crs=CrsMode.DYNAMIC)
    assert place(view, spec(), policy).node == "b"
    assert place(view, spec(), PlacementPolicy(crs=CrsMode.STATIC)).node == "a"
