"""High availability (Proxmox ``pve-ha-manager``): service and node states, fencing, manager status.

The vocabulary is Proxmox's: resources ``vm:ID``/``ct:ID``, service states, node states. The
elected manager publishes state transitions as events, one per transition, in the order it made
them, and its whole status after each round. A node's watchdog that kills its own HA guests
because it lost its lease says so in :class:`SelfFenced` (when it can reach the bus again).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Event, Kind, Scope, Subject
from rucher.proto.common import NodeName

Sid = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(vm|ct):[1-9][0-9]{2,8}$", description="An HA resource, vm:VMID or ct:VMID."
    ),
]
LeaseToken = Annotated[
    int, msgspec.Meta(ge=0, description="The fencing token of a node's or the manager's lease.")
]


class RequestedState(StrEnum):
    """The state an administrator asks for an HA resource."""

    STARTED = "started"
    STOPPED = "stopped"
    DISABLED = "disabled"
    IGNORED = "ignored"


class ServiceState(StrEnum):
    """The manager's state of an HA service."""

    REQUEST_START = "request_start"
    REQUEST_START_BALANCE = "request_start_balance"
    STARTED = "started"
    REQUEST_STOP = "request_stop"
    STOPPED = "stopped"
    MIGRATE = "migrate"
    RELOCATE = "relocate"
    FENCE = "fence"
    RECOVERY = "recovery"
    FREEZE = "freeze"
    ERROR = "error"


class NodeState(StrEnum):
    """The manager's state of a cluster node."""

    ONLINE = "online"
    MAINTENANCE = "maintenance"
    UNKNOWN = "unknown"
    FENCE = "fence"
    GONE = "gone"


class ArmedState(StrEnum):
    """Whether HA acts: armed, or disarmed (``disarm-ha``) and on the way there or back."""

    ARMED = "armed"
    STANDBY = "standby"
    DISARMING = "disarming"
    DISARMED = "disarmed"


class DisarmMode(StrEnum):
    """What happens to HA resources while HA is disarmed."""

    FREEZE = "freeze"
    IGNORE = "ignore"


class FenceMethod(StrEnum):
    """How a node was proved unable to run its guests."""

    LEASE_EXPIRED = "lease_expired"
    HOOK = "hook"
    MANUAL = "manual"


class HaResource(msgspec.Struct, frozen=True, kw_only=True):
    """An HA resource's configuration (``/cluster/ha/resources/{sid}``), Proxmox's defaults."""

    sid: Sid
    state: RequestedState = RequestedState.STARTED
    max_restart: Annotated[int, msgspec.Meta(ge=0)] = 1
    max_relocate: Annotated[int, msgspec.Meta(ge=0)] = 1
    failback: bool = True
    comment: str = ""
    group: str | None = None


class RuleType(StrEnum):
    """The kinds of HA rule (Proxmox 9 ``rules.cfg``)."""

    NODE_AFFINITY = "node-affinity"
    RESOURCE_AFFINITY = "resource-affinity"


class Affinity(StrEnum):
    """A resource-affinity rule keeps its resources together or apart."""

    POSITIVE = "positive"
    NEGATIVE = "negative"


HaName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z][A-Za-z0-9_\-]{1,127}$",
        description="An HA rule or group id (pve-configid).",
    ),
]


class HaRule(msgspec.Struct, frozen=True, kw_only=True):
    """A node-affinity rule (``nodes`` with priorities, ``strict``) or a resource-affinity one."""

    rule: HaName
    type: RuleType
    resources: tuple[Sid, ...]
    nodes: dict[NodeName, Annotated[int, msgspec.Meta(ge=0, le=1000)]] = {}
    strict: bool = False
    affinity: Affinity | None = None
    disable: bool = False
    comment: str = ""


class HaGroup(msgspec.Struct, frozen=True, kw_only=True):
    """An HA group (Proxmox before 9): preferred nodes, mapped onto a node-affinity rule."""

    group: HaName
    nodes: dict[NodeName, Annotated[int, msgspec.Meta(ge=0, le=1000)]]
    restricted: bool = False
    nofailback: bool = False
    comment: str = ""


class HaResources(msgspec.Struct, frozen=True, kw_only=True):
    """The ``resources`` document of the ``ha`` bucket: every HA resource by sid."""

    resources: dict[Sid, HaResource] = {}


class HaRules(msgspec.Struct, frozen=True, kw_only=True):
    """The ``rules`` document of the ``ha`` bucket: every rule by id."""

    rules: dict[HaName, HaRule] = {}


class HaGroups(msgspec.Struct, frozen=True, kw_only=True):
    """The ``groups`` document of the ``ha`` bucket: every group by id."""

    groups: dict[HaName, HaGroup] = {}


class HaControl(msgspec.Struct, frozen=True, kw_only=True):
    """The ``control`` document of the ``ha`` bucket: what the administrator wants of HA.

    ``armed`` false is ``disarm-ha`` (with ``disarm_mode``); ``maintenance`` lists the nodes
    put in maintenance. The manager reads it every round and acts on the difference.
    """

    armed: bool = True
    disarm_mode: DisarmMode | None = None
    maintenance: tuple[NodeName, ...] = ()


class CrmAction(StrEnum):
    """A one-off request to the manager (Proxmox's ``crm_commands``)."""

    MIGRATE = "migrate"
    RELOCATE = "relocate"


class CrmRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request under ``command.{id}`` in the ``ha`` bucket; the manager deletes it once read."""

    id: str
    action: CrmAction
    sid: Sid
    target: NodeName
    user: str
    time: float


class ServiceStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One service in the manager's status: its state, node and, while moving, its target."""

    state: ServiceState
    node: NodeName
    target: NodeName | None = None
    uid: str = ""
    failed_nodes: tuple[NodeName, ...] = ()


class ManagerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The manager's whole view (Proxmox's ``manager_status``), written after each round."""

    master_node: NodeName
    manager_token: LeaseToken
    timestamp: float
    node_status: dict[NodeName, NodeState]
    service_status: dict[Sid, ServiceStatus]
    armed_state: ArmedState = ArmedState.ARMED
    disarm_mode: DisarmMode | None = None


class HaServiceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One service in the manager's whole state: what a newly elected manager takes over.

    ``state`` is the manager's state (``request_start_balance`` included), ``cmd`` a queued
    command (``["migrate", "n2"]``, ``["stop", "0"]``), ``uid`` the id the LRM reports under.
    """

    state: str
    node: str
    uid: str = ""
    target: str | None = None
    timeout: int | None = None
    failed_nodes: tuple[str, ...] | None = None
    maintenance_node: str | None = None
    cmd: tuple[str, ...] | None = None
    running: bool = False


class HaDisarmRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A ``disarm-ha`` in progress: its mode and how far it got."""

    mode: str
    applied: bool = False
    disarmed: bool = False
    rearm: bool = False


class HaManagerState(msgspec.Struct, frozen=True, kw_only=True):
    """The manager's whole state under ``manager_state`` in the ``ha`` bucket (every round).

    ``node_epochs`` holds the fencing token of each node's lease as the manager saw it: a node
    whose LRM got a new lease acts only on a state that names its new token, so it never acts on
    decisions taken before it was fenced.
    """

    master_node: str
    manager_token: LeaseToken
    timestamp: float
    node_status: dict[str, str] = {}
    service_status: dict[str, HaServiceRecord] = {}
    node_request: dict[str, dict[str, bool]] = {}
    disarm: HaDisarmRecord | None = None
    node_epochs: dict[str, int] = {}


class HaLrmResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one command an LRM ran (Proxmox's exit codes)."""

    sid: str
    state: str
    exit_code: int


class HaLrmStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A node's LRM status under ``lrm.{node}`` in the ``ha`` bucket, written every round."""

    node: NodeName
    state: str
    mode: str = "active"
    results: dict[str, HaLrmResult] = {}
    timestamp: float = 0.0


class ServiceStateChanged(Event, frozen=True, kw_only=True, tag="ha.service.state_changed"):
    """An HA service changed state, on ``service_node`` (towards ``target`` when moving)."""

    sid: Sid
    state: ServiceState
    service_node: NodeName
    previous: ServiceState | None = None
    target: NodeName | None = None


class NodeStateChanged(Event, frozen=True, kw_only=True, tag="ha.node.state_changed"):
    """A cluster node changed state in the manager's view."""

    member: NodeName
    state: NodeState
    previous: NodeState | None = None


class FenceStarted(Event, frozen=True, kw_only=True, tag="ha.fence.started"):
    """The manager started fencing ``member``: its services wait until the fence succeeds."""

    member: NodeName
    reason: str = ""


class FenceSucceeded(Event, frozen=True, kw_only=True, tag="ha.fence.succeeded"):
    """``member`` provably runs no HA guest any more; its lease ``lease_token`` is dead."""

    member: NodeName
    method: FenceMethod
    lease_token: LeaseToken


class FenceFailed(Event, frozen=True, kw_only=True, tag="ha.fence.failed"):
    """A fence attempt (an external hook) failed; the manager keeps waiting or tries again."""

    member: NodeName
    method: FenceMethod
    reason: str


class SelfFenced(Event, frozen=True, kw_only=True, tag="ha.node.self_fenced"):
    """This node could not renew its lease in time, so its watchdog killed its HA guests."""

    sids: tuple[Sid, ...]
    lease_token: LeaseToken
    deadline: float


class ServiceRecovered(Event, frozen=True, kw_only=True, tag="ha.service.recovered"):
    """A service of a fenced node was assigned to ``target``: Proxmox's recovery log line."""

    sid: Sid
    fenced_node: NodeName
    target: NodeName


class ManagerElected(Event, frozen=True, kw_only=True, tag="ha.manager.elected"):
    """This node became the HA manager, holding the manager lease under ``manager_token``."""

    manager_token: LeaseToken
    previous: NodeName | None = None


class ManagerStatusPublished(Event, frozen=True, kw_only=True, tag="ha.manager.status_published"):
    """The manager's status after a round in which something changed."""

    status: ManagerStatus


SERVICE_STATE_CHANGED = Subject(
    "evt.ha.service_state_changed.{node}",
    ServiceStateChanged,
    Kind.EVENT,
    Scope.NODE,
    "The manager on {node} moved an HA service to a new state.",
)
NODE_STATE_CHANGED = Subject(
    "evt.ha.node_state_changed.{node}",
    NodeStateChanged,
    Kind.EVENT,
    Scope.NODE,
    "The manager on {node} moved a cluster node to a new state.",
)
FENCE_STARTED = Subject(
    "evt.ha.fence_started.{node}",
    FenceStarted,
    Kind.EVENT,
    Scope.NODE,
    "The manager on {node} started fencing a node.",
)
FENCE_SUCCEEDED = Subject(
    "evt.ha.fence_succeeded.{node}",
    FenceSucceeded,
    Kind.EVENT,
    Scope.NODE,
    "The manager on {node} proved a node fenced.",
)
FENCE_FAILED = Subject(
    "evt.ha.fence_failed.{node}",
    FenceFailed,
    Kind.EVENT,
    Scope.NODE,
    "A fence attempt by the manager on {node} failed.",
)
NODE_SELF_FENCED = Subject(
    "evt.ha.node_self_fenced.{node}",
    SelfFenced,
    Kind.EVENT,
    Scope.NODE,
    "The watchdog of {node} killed its HA guests after losing the node's lease.",
)
SERVICE_RECOVERED = Subject(
    "evt.ha.service_recovered.{node}",
    ServiceRecovered,
    Kind.EVENT,
    Scope.NODE,
    "The manager on {node} recovered a service from a fenced node.",
)
MANAGER_ELECTED = Subject(
    "evt.ha.manager_elected.{node}",
    ManagerElected,
    Kind.EVENT,
    Scope.NODE,
    "{node} became the HA manager.",
)
MANAGER_STATUS_PUBLISHED = Subject(
    "evt.ha.manager_status_published.{node}",
    ManagerStatusPublished,
    Kind.EVENT,
    Scope.NODE,
    "The status of the HA manager running on {node}.",
)
