"""The decision core's data: resource configuration, manager and node status, settings, rules.

Mutable where the manager mutates them (its service status), plain values elsewhere. The names
follow Proxmox's ``pve-ha-manager`` so the states read the same in logs and in the API.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from enum import IntEnum

SID_PATTERN = re.compile(r"^(vm|ct|fa):(\d+)$")


class ExitCode(IntEnum):
    """Results of a resource command on a node, as the LRM reports them to the manager."""

    SUCCESS = 0
    ERROR = 1
    ETRY_AGAIN = 2
    EUNKNOWN_SERVICE_TYPE = 3
    EUNKNOWN_SERVICE = 4
    EINVALID_PARAMETER = 5
    EUNKNOWN_COMMAND = 6
    EWRONG_NODE = 7
    IGNORED = 8


def parse_sid(sid: str) -> tuple[str, str]:
    """Split ``vm:100`` into its type and id; a clear error for anything else."""
    match = SID_PATTERN.match(sid)
    if match is None:
        raise ValueError(f"invalid HA resource id {sid!r} (expected vm:ID or ct:ID)")
    return match.group(1), match.group(2)


@dataclass
class ServiceConfig:
    """One HA resource's configuration with Proxmox's defaults filled in."""

    sid: str
    node: str
    state: str = "started"
    max_restart: int = 1
    max_relocate: int = 1
    failback: bool = True
    group: str | None = None

    @property
    def type(self) -> str:
        """The resource type: ``vm``, ``ct`` (or ``fa``, the simulator's failing VM)."""
        return parse_sid(self.sid)[0]


@dataclass
class ServiceData:
    """The manager's status of one service (Proxmox's ``$sd``)."""

    state: str
    node: str
    uid: str = ""
    target: str | None = None
    timeout: int | None = None
    failed_nodes: list[str] | None = None
    maintenance_node: str | None = None
    cmd: list[str] | None = None
    running: bool = False


@dataclass
class DisarmState:
    """A ``disarm-ha`` request: its mode and whether every LRM already let go."""

    mode: str
    applied: bool = False
    disarmed: bool = False
    rearm: bool = False


@dataclass
class ManagerState:
    """The manager's published status (Proxmox's ``manager_status``)."""

    master_node: str = ""
    timestamp: float = 0.0
    node_status: dict[str, str] = field(default_factory=dict)
    service_status: dict[str, ServiceData] = field(default_factory=dict)
    node_request: dict[str, dict[str, bool]] = field(default_factory=dict)
    disarm: DisarmState | None = None

    def copy(self) -> ManagerState:
        """A deep copy, so readers never share the writer's objects."""
        return copy.deepcopy(self)


@dataclass
class LrmResult:
    """The outcome of one resource command, keyed by the command's uid."""

    sid: str
    state: str
    exit_code: int


@dataclass
class LrmStatus:
    """A node's published LRM status."""

    state: str = ""
    mode: str = "active"
    results: dict[str, LrmResult] = field(default_factory=dict)
    timestamp: float = 0.0


@dataclass(frozen=True)
class ClusterSettings:
    """Datacenter-wide settings: shutdown policy and cluster resource scheduling (CRS)."""

    shutdown_policy: str = "conditional"
    crs_mode: str = "basic"
    rebalance_on_start: bool = False
    auto_rebalance: bool = False
    auto_rebalance_method: str = "bruteforce"
    auto_rebalance_threshold: float = 0.3
    auto_rebalance_margin: float = 0.1
    auto_rebalance_hold: int = 3
    # Seconds a node must be out of the quorate partition before its services are fenced
    # (Proxmox: 60). The live service lowers it: its fence needs the node's lease expired anyway.
    fence_delay: float = 60.0


@dataclass(frozen=True)
class NodeCapacity:
    """A node's CPUs and memory (bytes)."""

    maxcpu: float = 0.0
    maxmem: float = 0.0


@dataclass(frozen=True)
class ResourceStats:
    """A resource's configured (max) and measured CPU and memory use."""

    maxcpu: float = 0.0
    maxmem: float = 0.0
    cpu: float = 0.0
    mem: float = 0.0


@dataclass(frozen=True)
class NodeAffinityRule:
    """Resources that prefer (or, strict, must use) nodes, each node with a priority."""

    name: str
    resources: tuple[str, ...]
    nodes: dict[str, int]
    strict: bool = False


@dataclass(frozen=True)
class ResourceAffinityRule:
    """Resources kept together (``positive``) or apart (``negative``)."""

    name: str
    resources: tuple[str, ...]
    affinity: str


@dataclass(frozen=True)
class Group:
    """An older HA group: prioritised nodes, ``restricted`` and ``nofailback``."""

    name: str
    nodes: dict[str, int]
    restricted: bool = False
    nofailback: bool = False


@dataclass(frozen=True)
class RulesConfig:
    """The rules and groups the manager places services with."""

    node_affinity: tuple[NodeAffinityRule, ...] = ()
    resource_affinity: tuple[ResourceAffinityRule, ...] = ()
    groups: dict[str, Group] = field(default_factory=dict)
