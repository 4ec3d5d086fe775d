"""Cluster membership and node capacity, as the nodes' agents publish them.

The compute agent of each node publishes its CPUs, memory and NUMA layout; the storage service
and the GPU broker publish their parts of a node's capacity in their own contexts
(:class:`~rucher.proto.storage.StorageStatusPublished`,
:class:`~rucher.proto.gpu.InventoryPublished`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Event, Kind, Scope, Subject
from rucher.proto.common import ByteSize, Fraction, NodeName, Seconds


class CpuArch(StrEnum):
    """CPU architectures, by the names QEMU and Proxmox's ``arch`` option use."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class LeaveReason(StrEnum):
    """Why a node stopped being a member."""

    SHUTDOWN = "shutdown"
    REMOVED = "removed"
    LOST = "lost"


class NumaNode(msgspec.Struct, frozen=True, kw_only=True):
    """One NUMA node of a host: its CPUs and memory."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    cpus: tuple[Annotated[int, msgspec.Meta(ge=0)], ...]
    memory: ByteSize


class NodeCapacity(msgspec.Struct, frozen=True, kw_only=True):
    """What a node offers and uses now (``/nodes/{node}/status``, the scheduler's input).

    ``cpus`` counts logical CPUs; ``cpu_usage`` is the share of them in use; ``kvm`` says
    whether hardware virtualisation really works (otherwise guests run under TCG).
    """

    node: NodeName
    arch: CpuArch
    cpu_model: str
    cpus: Annotated[int, msgspec.Meta(ge=1)]
    sockets: Annotated[int, msgspec.Meta(ge=1)]
    memory_total: ByteSize
    memory_used: ByteSize
    time: float
    cpu_flags: tuple[str, ...] = ()
    numa: tuple[NumaNode, ...] = ()
    cpu_usage: Fraction = 0.0
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    swap_total: ByteSize = 0
    swap_used: ByteSize = 0
    uptime: Seconds = 0.0
    kvm: bool = False
    version: str = ""


class NodeJoined(Event, frozen=True, kw_only=True, tag="cluster.node.joined"):
    """A node became a member (its first service registered)."""

    member: NodeName
    address: str = ""
    version: str = ""


class NodeLeft(Event, frozen=True, kw_only=True, tag="cluster.node.left"):
    """A node stopped being a member: shut down, removed, or its registrations expired."""

    member: NodeName
    reason: LeaveReason


class CapacityPublished(Event, frozen=True, kw_only=True, tag="cluster.node.capacity_published"):
    """A node's capacity and usage, published at start and when it changes noticeably."""

    capacity: NodeCapacity


NODE_JOINED = Subject(
    "evt.cluster.node_joined.{node}",
    NodeJoined,
    Kind.EVENT,
    Scope.NODE,
    "A node joined the cluster (seen by {node}).",
)
NODE_LEFT = Subject(
    "evt.cluster.node_left.{node}",
    NodeLeft,
    Kind.EVENT,
    Scope.NODE,
    "A node left the cluster (seen by {node}).",
)
NODE_CAPACITY_PUBLISHED = Subject(
    "evt.cluster.node_capacity_published.{node}",
    CapacityPublished,
    Kind.EVENT,
    Scope.NODE,
    "The capacity and usage of {node}.",
)
