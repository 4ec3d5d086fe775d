"""Placement: where a guest should run, reserved by an atomic claim until its agent confirms it.

Any scheduler instance answers (``rpc.scheduler.<name>``, a queue group). A decision reserves
the node's resources with a claim written by compare-and-set; the agent that starts the guest
confirms the claim, and an unconfirmed claim expires. A refused placement is an error reply
whose ``details`` carry the :class:`FilterOutcome` list (which filter removed how many nodes).

Claims live in two buckets: ``allocations`` holds one :class:`NodeAllocations` document per node
(every claim on it, written by compare-and-set: the reservation itself), and ``claims`` holds
each unconfirmed :class:`Claim` under its id with a per-key TTL, so its expiry is observed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Command, Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.cluster import CpuArch
from rucher.proto.common import ByteSize, Done, NodeName, Query, Seconds, StorageId, Vmid
from rucher.proto.gpu import GpuKind, MigProfileName, PciId
from rucher.proto.guest import GuestType

ClaimTtl = Annotated[
    float, msgspec.Meta(gt=0, le=3600, description="Seconds an unconfirmed claim is held.")
]


class ClaimEnd(StrEnum):
    """Why a claim stopped holding resources."""

    RELEASED = "released"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"


class PlacementStrategy(StrEnum):
    """Spread guests over nodes (most free room first) or pack them (fullest node that fits)."""

    SPREAD = "spread"
    PACK = "pack"


class CrsMode(StrEnum):
    """Proxmox's cluster resource scheduling modes (``datacenter.cfg`` ``crs: ha=...``)."""

    BASIC = "basic"
    STATIC = "static"
    DYNAMIC = "dynamic"


class AffinityKind(StrEnum):
    """A resource-affinity rule keeps its resources together (positive) or apart (negative)."""

    POSITIVE = "positive"
    NEGATIVE = "negative"


# Records -------------------------------------------------------------------------------------


class GpuRequest(msgspec.Struct, frozen=True, kw_only=True):
    """GPUs a guest needs: whole devices, an mdev type, a MIG profile, a VF, or a named mapping."""

    kind: GpuKind
    count: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    vendor_id: PciId | None = None
    device_id: PciId | None = None
    mdev_type: str | None = None
    mig_profile: MigProfileName | None = None
    mapping: str | None = None


class ResourceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What one guest needs from a node."""

    vcpus: Annotated[int, msgspec.Meta(ge=1)]
    memory: ByteSize
    arch: CpuArch = CpuArch.X86_64
    cpu_flags: tuple[str, ...] = ()
    storages: tuple[StorageId, ...] = ()
    gpus: tuple[GpuRequest, ...] = ()


class NodePriority(msgspec.Struct, frozen=True, kw_only=True):
    """One node of a node-affinity rule and its priority (higher is preferred)."""

    node: NodeName
    priority: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0


class NodeAffinity(msgspec.Struct, frozen=True, kw_only=True):
    """An HA node-affinity rule as it applies to one guest.

    Strict: only these nodes. Non-strict: these nodes first, highest priority first, then any.
    """

    nodes: Annotated[tuple[NodePriority, ...], msgspec.Meta(min_length=1)]
    strict: bool = False


class ResourceAffinity(msgspec.Struct, frozen=True, kw_only=True):
    """An HA resource-affinity rule as it applies to one guest: the other guests it names."""

    affinity: AffinityKind
    vmids: Annotated[tuple[Vmid, ...], msgspec.Meta(min_length=1)]


class PlacementPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How to rank the nodes that can run a guest; the scheduler's settings give the default."""

    strategy: PlacementStrategy = PlacementStrategy.SPREAD
    crs: CrsMode | None = None


class PlacementSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One guest to place: its identity (for affinity rules), needs and node constraints."""

    vmid: Vmid
    guest_type: GuestType
    resources: ResourceRequest
    candidates: tuple[NodeName, ...] = ()
    exclude: tuple[NodeName, ...] = ()
    node_affinity: NodeAffinity | None = None
    resource_affinity: tuple[ResourceAffinity, ...] = ()


class FilterOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How many candidate nodes one filter removed, and why."""

    filter: str
    removed: Annotated[int, msgspec.Meta(ge=0)]
    remaining: Annotated[int, msgspec.Meta(ge=0)]
    reason: str = ""


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """A chosen node and the claim reserving it; ``claim_token`` fences a stale scheduler."""

    vmid: Vmid
    node: NodeName
    claim_id: str
    claim_token: int
    expires: float
    score: float = 0.0


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """Resources reserved on a node for one guest, in the cluster store until confirmed."""

    claim_id: str
    node: NodeName
    vmid: Vmid
    guest_type: GuestType
    resources: ResourceRequest
    token: int
    created: float
    expires: float
    scheduler: str
    confirmed: bool = False
    node_affinity: NodeAffinity | None = None
    resource_affinity: tuple[ResourceAffinity, ...] = ()


class NodeAllocations(msgspec.Struct, frozen=True, kw_only=True):
    """The ``allocations`` bucket's value for one node: every claim holding its resources.

    Written only by compare-and-set on the revision read, so two schedulers never both fit a
    guest into the same room. An unconfirmed claim counts until ``expires``; a confirmed one
    counts until it is released or its guest leaves the node.
    """

    node: NodeName
    claims: tuple[Claim, ...] = ()
    updated: float = 0.0


class RebalanceMove(msgspec.Struct, frozen=True, kw_only=True):
    """One proposed move and how much it lowers the imbalance."""

    vmid: Vmid
    guest_type: GuestType
    source: NodeName
    target: NodeName
    gain: float


# Requests and replies ------------------------------------------------------------------------


class PlaceGuest(Command, frozen=True, kw_only=True, tag="scheduler.guest.place"):
    """Choose a node for one guest and claim its resources."""

    spec: PlacementSpec
    claim_ttl: ClaimTtl = 60.0
    policy: PlacementPolicy | None = None


class PlaceGroup(Command, frozen=True, kw_only=True, tag="scheduler.group.place"):
    """Place several guests all or nothing: either every one gets a claim, or none does."""

    specs: Annotated[tuple[PlacementSpec, ...], msgspec.Meta(min_length=1)]
    claim_ttl: ClaimTtl = 60.0
    policy: PlacementPolicy | None = None


class SuggestMigration(Command, frozen=True, kw_only=True, tag="scheduler.migration.suggest"):
    """Choose and claim a migration target for a guest now on ``source``."""

    spec: PlacementSpec
    source: NodeName
    claim_ttl: ClaimTtl = 60.0
    policy: PlacementPolicy | None = None


class PlanRebalance(Query, frozen=True, kw_only=True, tag="scheduler.rebalance.plan"):
    """Propose moves that lower the cluster's imbalance, at most ``max_moves``; claims nothing."""

    max_moves: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    nodes: tuple[NodeName, ...] = ()
    policy: PlacementPolicy | None = None


class PlacementDecision(Reply, frozen=True, kw_only=True, tag="scheduler.placement.decision"):
    """Where a guest goes, under which claim, and how the filters narrowed the candidates."""

    placement: Placement
    filters: tuple[FilterOutcome, ...] = ()


class GroupDecision(Reply, frozen=True, kw_only=True, tag="scheduler.group.decision"):
    """Where every guest of a group goes, each under its own claim."""

    placements: tuple[Placement, ...]


class RebalancePlan(Reply, frozen=True, kw_only=True, tag="scheduler.rebalance.proposal"):
    """Proposed moves, best first, with the imbalance before and after them."""

    moves: tuple[RebalanceMove, ...]
    imbalance_before: float
    imbalance_after: float


class ClaimConfirm(Command, frozen=True, kw_only=True, tag="scheduler.claim.confirm"):
    """The agent started the guest: keep the claim's resources as used, without expiry."""

    claim_id: str
    claim_token: int
    node: NodeName
    vmid: Vmid


class ClaimRelease(Command, frozen=True, kw_only=True, tag="scheduler.claim.release"):
    """Give a claim's resources back (the create or start it was for failed or was cancelled).

    With ``vmid`` and ``node`` and an empty ``claim_id``, every claim of that guest on that node
    is released (its agent destroyed the guest and does not keep claim ids).
    """

    claim_id: str
    reason: str = ""
    node: NodeName | None = None
    vmid: Vmid | None = None


# Events --------------------------------------------------------------------------------------


class ClaimCreated(Event, frozen=True, kw_only=True, tag="scheduler.claim.created"):
    """A scheduler reserved resources on a node."""

    claim: Claim


class ClaimConfirmed(Event, frozen=True, kw_only=True, tag="scheduler.claim.confirmed"):
    """An agent confirmed a claim: the guest runs on the claimed node."""

    claim_id: str
    target: NodeName
    vmid: Vmid


class ClaimEnded(Event, frozen=True, kw_only=True, tag="scheduler.claim.ended"):
    """A claim no longer holds resources: released, expired unconfirmed, or superseded."""

    claim_id: str
    target: NodeName
    vmid: Vmid
    outcome: ClaimEnd
    held: Seconds = 0.0


# Subjects ------------------------------------------------------------------------------------

GUEST_PLACE = RpcSubject(
    "rpc.scheduler.guest_place",
    PlaceGuest,
    Kind.RPC,
    Scope.CLUSTER,
    "Place one guest and claim its resources.",
    reply=PlacementDecision,
)
GROUP_PLACE = RpcSubject(
    "rpc.scheduler.group_place",
    PlaceGroup,
    Kind.RPC,
    Scope.CLUSTER,
    "Place a group of guests, all or nothing.",
    reply=GroupDecision,
)
MIGRATION_SUGGEST = RpcSubject(
    "rpc.scheduler.migration_suggest",
    SuggestMigration,
    Kind.RPC,
    Scope.CLUSTER,
    "Choose and claim a migration target for a guest.",
    reply=PlacementDecision,
)
REBALANCE_PLAN = RpcSubject(
    "rpc.scheduler.rebalance_plan",
    PlanRebalance,
    Kind.RPC,
    Scope.CLUSTER,
    "Propose moves that lower the cluster's imbalance.",
    reply=RebalancePlan,
)
CLAIM_CONFIRM = RpcSubject(
    "rpc.scheduler.claim_confirm",
    ClaimConfirm,
    Kind.RPC,
    Scope.CLUSTER,
    "Confirm a claim once its guest runs.",
    reply=Done,
)
CLAIM_RELEASE = Subject(
    "cmd.scheduler.claim_release",
    ClaimRelease,
    Kind.COMMAND,
    Scope.CLUSTER,
    "Give a claim's resources back; durable, so a release is never lost.",
)

CLAIM_CREATED = Subject(
    "evt.scheduler.claim_created.{node}",
    ClaimCreated,
    Kind.EVENT,
    Scope.NODE,
    "The scheduler instance on {node} claimed resources for a guest.",
)
CLAIM_CONFIRMED = Subject(
    "evt.scheduler.claim_confirmed.{node}",
    ClaimConfirmed,
    Kind.EVENT,
    Scope.NODE,
    "A claim was confirmed (published by the instance on {node} that recorded it).",
)
CLAIM_ENDED = Subject(
    "evt.scheduler.claim_ended.{node}",
    ClaimEnded,
    Kind.EVENT,
    Scope.NODE,
    "A claim stopped holding resources (observed by the instance on {node}).",
)
