"""Place a group of guests all or nothing, and choose migration targets.

Guests a positive resource-affinity rule binds together are placed as one (their needs
summed) so they land on a node that holds them all; the others one by one, largest first, each
seeing the tentative places of those before it (so negative rules inside the group hold). The
view is left exactly as it was found: committing the decisions is the caller's business.
"""

from __future__ import annotations

from collections.abc import Sequence

from rucher.placement.demand import PlacementError, compile_demand, label
from rucher.placement.engine import DEFAULT_OPTIONS, Decision, Options, place, place_demand
from rucher.placement.view import ClusterView, Reservation
from rucher.proto.scheduler import (
    AffinityKind,
    PlacementPolicy,
    PlacementSpec,
    ResourceAffinity,
    ResourceRequest,
)

TENTATIVE = "tentative:"


def _components(specs: Sequence[PlacementSpec]) -> list[list[PlacementSpec]]:
    """Specs grouped by positive affinity between members of the group (union-find)."""
    parent = {spec.vmid: spec.vmid for spec in specs}

    def root(vmid: int) -> int:
        while parent[vmid] != vmid:
            parent[vmid] = parent[parent[vmid]]
            vmid = parent[vmid]
        return vmid

    for spec in specs:
        for rule in spec.resource_affinity:
            if rule.affinity is AffinityKind.POSITIVE:
                for other in rule.vmids:
                    if other in parent:
                        parent[root(other)] = root(spec.vmid)
    groups: dict[int, list[PlacementSpec]] = {}
    for spec in specs:
        groups.setdefault(root(spec.vmid), []).append(spec)
    return sorted(groups.values(), key=lambda group: -sum(spec.resources.memory for spec in group))


def _combined(members: list[PlacementSpec]) -> PlacementSpec:
    """One spec needing what all ``members`` need, under all of their constraints."""
    first = members[0]
    archs = {spec.resources.arch for spec in members}
    if len(archs) > 1:
        raise PlacementError(
            f"resource-affinity: {', '.join(label(s) for s in members)} must run together "
            "but need different CPU architectures",
            impossible=True,
            field="resource_affinity",
        )
    inside = {spec.vmid for spec in members}
    rules: list[ResourceAffinity] = []
    for spec in members:
        for rule in spec.resource_affinity:
            outside = tuple(v for v in rule.vmids if v not in inside)
            if outside:
                rules.append(ResourceAffinity(affinity=rule.affinity, vmids=outside))
    candidates: set[str] | None = None
    for spec in members:
        if spec.candidates:
            wanted = set(spec.candidates)
            candidates = wanted if candidates is None else candidates & wanted
    affinities = [spec.node_affinity for spec in members if spec.node_affinity is not None]
    strict = [rule for rule in affinities if rule.strict]
    return PlacementSpec(
        vmid=first.vmid,
        guest_type=first.guest_type,
        resources=ResourceRequest(
            vcpus=sum(spec.resources.vcpus for spec in members),
            memory=sum(spec.resources.memory for spec in members),
            arch=first.resources.arch,
            cpu_flags=tuple(sorted({f for s in members for f in s.resources.cpu_flags})),
            storages=tuple(sorted({st for s in members for st in s.resources.storages})),
            gpus=tuple(g for spec in members for g in spec.resources.gpus),
        ),
        candidates=tuple(sorted(candidates)) if candidates is not None else (),
        exclude=tuple(sorted({node for spec in members for node in spec.exclude})),
        node_affinity=(strict or affinities)[0] if affinities else None,
        resource_affinity=tuple(rules),
    )


def place_group(
    view: ClusterView,
    specs: Sequence[PlacementSpec],
    policy: PlacementPolicy | None = None,
    options: Options = DEFAULT_OPTIONS,
) -> list[Decision]:
    """A node for every guest of ``specs`` (in their order), or :class:`PlacementError`."""
    vmids = [spec.vmid for spec in specs]
    if len(set(vmids)) != len(vmids):
        raise PlacementError("a group names the same guest twice", impossible=True, field="specs")
    held: list[tuple[int, str]] = []
    decided: dict[int, Decision] = {}
    try:
        for members in _components(specs):
            spec = members[0] if len(members) == 1 else _combined(members)
            decision = place(view, spec, policy, options)
            for member in members:
                demand = decision.demand if len(members) == 1 else compile_demand(view, member)
                decided[member.vmid] = Decision(
                    node=decision.node,
                    row=decision.row,
                    score=decision.score,
                    outcomes=decision.outcomes,
                    examined=decision.examined,
                    demand=demand,
                )
                key = f"{TENTATIVE}{member.vmid}"
                view.reserve(
                    decision.row, Reservation(key=key, vmid=member.vmid, resources=member.resources)
                )
                held.append((decision.row, key))
    finally:
        for row, key in reversed(held):
            view.release(row, key)
    return [decided[vmid] for vmid in vmids]


def suggest_migration(
    view: ClusterView,
    spec: PlacementSpec,
    source: str,
    policy: PlacementPolicy | None = None,
    options: Options = DEFAULT_OPTIONS,
) -> Decision:
    """The best node to move a guest to from ``source`` (never ``source`` itself)."""
    moved = PlacementSpec(
        vmid=spec.vmid,
        guest_type=spec.guest_type,
        resources=spec.resources,
        candidates=spec.candidates,
        exclude=(*spec.exclude, source),
        node_affinity=spec.node_affinity,
        resource_affinity=spec.resource_affinity,
    )
    return place_demand(view, compile_demand(view, moved), policy, options)
