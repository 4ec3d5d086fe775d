"""The live :class:`~rucher.ha.env.HaEnvironment`: the decision core over the real cluster.

The core is synchronous, so each round runs in a worker thread; this environment answers reads
from the :class:`~rucher.ha.live.cache.ClusterCache` (plain lookups) and runs every write, lock
and agent call as a coroutine on the service's event loop, waiting for it with a timeout. A
failure reaches the core as ``OSError``, which it treats as "the cluster store did not answer".

Mapping onto Proxmox's model: the manager lock is the ``ha-manager`` lease; a node's agent lock
is its ``ha-node:{node}`` lease, held by the node's watchdog (:mod:`rucher.ha.watchdog`) for as
long as the service runs, so the LRM's own ``watchdog_*`` calls have nothing left to do; the
manager fences a node by taking that lease once it expired. An LRM acts only on a manager state
that names its node's current lease token (``node_epochs``): after a fence, a node that got its
lease back never acts on decisions taken before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import structlog

from rucher.bus import RucherError
from rucher.ha.live.actions import ActionError, ClusterActions
from rucher.ha.live.cache import ClusterCache, node_holder
from rucher.ha.live.records import (
    control_commands,
    guest_stats,
    lrm_to_record,
    public_status,
    record_to_lrm,
    record_to_state,
    rules_config,
    service_configs,
    state_to_record,
    vmid_of,
)
from rucher.ha.model import (
    ClusterSettings,
    LrmStatus,
    ManagerState,
    NodeCapacity,
    ResourceStats,
    RulesConfig,
    ServiceConfig,
)
from rucher.proto.cluster import NodeCapacity as PublishedCapacity
from rucher.proto.common import PowerState
from rucher.proto.ha import HaManagerState

log = structlog.get_logger("rucher.ha.live")

R = TypeVar("R")
LEVELS = {"err": "error", "warning": "warning", "warn": "warning", "crit": "critical"}
# Written although unchanged at least this often, so the status shows a live manager.
HEARTBEAT = 5.0


@dataclass(frozen=True)
class Timeouts:
    """How long a round waits for each kind of call before counting it as failed."""

    store: float = 5.0
    read: float = 1.0
    lock: float = 2.0
    action: float = 150.0


class Bridge:
    """Runs coroutines on the service's loop from a round's thread and waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call(self, coroutine: Coroutine[Any, Any, R], timeout: float) -> R:
        """The coroutine's result; ``OSError`` when it failed or did not finish in time."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as err:
            future.cancel()
            raise OSError(f"no answer within {timeout} s") from err
        except RucherError as err:
            raise OSError(err.message) from err
        except ActionError as err:
            raise OSError(str(err)) from err


class LiveEnv:
    """One node's CRM or LRM environment over the cluster (see the module's docstring)."""

    def __init__(
        self,
        *,
        node: str,
        role: str,
        cache: ClusterCache,
        actions: ClusterActions,
        bridge: Bridge,
        epoch: Callable[[], int | None],
        settings: ClusterSettings,
        capacity: Callable[[str], PublishedCapacity | None],
        stopping: threading.Event,
        timeouts: Timeouts = Timeouts(),
        node_shutdown: Callable[[], tuple[bool, bool]] = lambda: (False, False),
    ) -> None:
        self.node = node
        self.role = role
        self.cache = cache
        self.actions = actions
        self.bridge = bridge
        self.epoch = epoch
        self.settings = settings
        self.capacity = capacity
        self.stopping = stopping
        self.timeouts = timeouts
        self.node_shutdown = node_shutdown
        self.log_ = log.bind(role=role)
        self._written: tuple[object, float] | None = None
        self._last_state: HaManagerState | None = None
        self._online: dict[str, int] | None = None
        self._no_sleep = False

    # --- basics ----------------------------------------------------------------------------

    def nodename(self) -> str:
        """This node."""
        return self.node

    def now(self) -> float:
        """Wall-clock seconds (the status shows them; intervals here are seconds long)."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """Wait, cut short when the service stops (skipped when waiting cannot help)."""
        if not self._no_sleep:
            self.stopping.wait(seconds)

    def log(self, level: str, message: str) -> None:
        """Log one core line (Proxmox's wording) as the ``message`` field."""
        method = getattr(self.log_, LEVELS.get(level, "info"))
        method("ha_" + self.role, message=message, level=level)

    # --- membership and locks --------------------------------------------------------------

    def quorate(self) -> bool:
        """Whether this node holds its HA lease: its writes reach a quorum of the store."""
        return self.epoch() is not None

    def node_info(self) -> dict[str, bool]:
        """Members (nodes that ran an LRM or hold a lease) and whether each holds its lease."""
        members = set(self.cache.lrm_nodes()) | set(self.cache.node_leases()) | {self.node}
        state = self.cache.manager_state()
        if state is not None:
            members |= set(state.node_status)
        self._online = self._online_nodes(sorted(members))
        return {node: node in self._online for node in sorted(members)}

    def _online_nodes(self, members: list[str]) -> dict[str, int]:
        """Members whose own watchdog holds their lease, with its token, read directly.

        The leases watch stalls for seconds when the node that died led the bucket's stream:
        an expired lease must still be seen at once (the cache only when the store is away).
        """
        try:
            records = self.bridge.call(self.actions.node_leases(members), self.timeouts.read)
        except OSError:
            return self.cache.online_nodes()
        return {
            node: record.token
            for node, record in records.items()
            if record is not None and record.holder == node_holder(node) and record.token > 0
        }

    def get_manager_lock(self) -> bool:
        """Take or renew the ``ha-manager`` lease."""
        try:
            return self.bridge.call(self.actions.manager_lock(), self.timeouts.lock)
        except OSError as err:
            self.log("warning", f"manager lock: {err}")
            return False

    def release_manager_lock(self) -> bool:
        """Give the manager lease up."""
        try:
            return self.bridge.call(self.actions.release_manager_lock(), self.timeouts.lock)
        except OSError:
            return False

    def get_agent_lock(self, node: str | None = None) -> bool:
        """This node: its lease is held and the manager saw it; another node: fence it."""
        if node is None or node == self.node:
            epoch = self.epoch()
            state = self._last_state
            if epoch is None or state is None or state.node_epochs.get(self.node) != epoch:
                # Decided before the manager saw this epoch: this round must not act on it, and
                # waiting within the round cannot help (its state is read once), so no sleeping
                # until the next round reads the state again.
                self._no_sleep = True
                return False
            return True
        try:
            return self.bridge.call(self.actions.fence(node), self.timeouts.lock)
        except OSError as err:
            self.log("warning", f"fence of node '{node}': {err}")
            return False

    def release_agent_lock(self) -> bool:
        """The node lease stays with the watchdog for as long as the service runs."""
        return True

    def watchdog_open(self) -> str:
        """The node watchdog is armed for the whole life of the service: a handle only."""
        return f"{self.node}/{self.role}"

    def watchdog_update(self, handle: str) -> None:
        """The node watchdog feeds itself by renewing the node lease."""

    def watchdog_close(self, handle: str) -> None:
        """Nothing to close: the node watchdog outlives the LRM's use of it."""

    # --- cluster state ---------------------------------------------------------------------

    def _manager_record(self) -> HaManagerState | None:
        """The manager's state, read directly (the cache only when the store does not answer).

        A watch can lag for seconds while its stream's leader moves (its consumer lived there),
        and an LRM must act on the current state.
        """
        try:
            return self.bridge.call(self.actions.read_manager_state(), self.timeouts.read)
        except OSError:
            return self.cache.manager_state()

    def read_manager_status(self) -> ManagerState:
        """The manager's last written state."""
        record = self._manager_record()
        self._last_state = record
        self._no_sleep = False
        return record_to_state(record)

    def write_manager_status(self, status: ManagerState) -> None:
        """Write the manager's state (when it changed, or as a heartbeat)."""
        epochs = self._online if self._online is not None else self.cache.online_nodes()
        record = state_to_record(status, self.actions.manager_token, epochs)
        content = _without_time(record)
        if self._unchanged(content):
            return
        self.bridge.call(
            self.actions.write_manager_state(record, public_status(record)), self.timeouts.store
        )
        self._written = (content, time.monotonic())

    def _unchanged(self, content: object) -> bool:
        if self._written is None:
            return False
        last, at = self._written
        return last == content and time.monotonic() - at < HEARTBEAT

    def read_lrm_status(self, node: str | None = None) -> LrmStatus:
        """A node's last written LRM status."""
        return record_to_lrm(self.cache.lrm_status(node or self.node))

    def write_lrm_status(self, status: LrmStatus) -> None:
        """Write this node's LRM status (when it changed, or as a heartbeat)."""
        record = lrm_to_record(self.node, status)
        content = _without_time(record)
        if self._unchanged(content):
            return
        self.bridge.call(self.actions.write_lrm_status(record), self.timeouts.store)
        self._written = (content, time.monotonic())

    def read_service_config(self) -> dict[str, ServiceConfig]:
        """The resources, each on the node that owns its guest, as the registry's leader has it.

        Read directly: right after a recovery the registry's new owner must be seen at once. When
        the leader does not answer (an election) the round fails (``OSError``) and runs again;
        the watch's copy is no stand-in, since it may still name the fenced node (seen in CI: an
        LRM answered "not on this node" for a guest it had just started, and the manager
        live-migrated it away under that wrong error).
        """
        resources = self.cache.resources()
        vmids = [v for v in (vmid_of(sid) for sid in resources.resources) if v is not None]
        guests = self.bridge.call(self.actions.guest_records(vmids), self.timeouts.read)
        return service_configs(resources, guests)

    def update_service_config(self, sid: str, state: str) -> None:
        """Change a resource's requested state."""
        self.bridge.call(self.actions.set_requested_state(sid, state), self.timeouts.store)

    def steal_service(self, sid: str, current_node: str, new_node: str) -> None:
        """Give a fenced node's guest to its recovery node (the registry's owner)."""
        vmid = vmid_of(sid)
        if vmid is None:
            return  # containers are not compute guests yet: the simulator covers them
        capacity = self.capacity(new_node)
        stealing = self.actions.steal(
            vmid, current_node, new_node, capacity=capacity, guests=self.cache.guests()
        )
        self.bridge.call(stealing, self.timeouts.store)  # NoRoomError reaches the core as it is

    def read_rules(self) -> RulesConfig:
        """The enabled rules and the groups."""
        return rules_config(self.cache.rules(), self.cache.groups())

    def read_crm_commands(self) -> list[str]:
        """Queued migrate/relocate requests (taken now) and the administrator's wishes."""
        requests = self.cache.requests()
        commands = [f"{r.action.value} {r.sid} {r.target}" for r in requests]
        if requests:
            self.bridge.call(self.actions.take_requests(requests), self.timeouts.store)
        return commands + control_commands(self.cache.control(), self.read_manager_status())

    def cluster_settings(self) -> ClusterSettings:
        """The service's HA and CRS settings."""
        return self.settings

    def is_node_shutdown(self) -> tuple[bool, bool]:
        """Whether the node is going down (the service was told so), and whether it reboots."""
        return self.node_shutdown()

    def has_crm_commands(self) -> bool:
        """Whether requests are queued or the administrator's wishes are not applied yet."""
        if self.cache.requests():
            return True
        return bool(control_commands(self.cache.control(), self.read_manager_status()))

    def node_capacity(self, node: str) -> NodeCapacity:
        """A node's CPUs and memory as its compute agent last published them."""
        published = self.capacity(node)
        if published is None:
            return NodeCapacity()
        return NodeCapacity(maxcpu=float(published.cpus), maxmem=float(published.memory_total))

    def resource_stats(self, sid: str) -> ResourceStats:
        """A guest's configured CPUs and memory (used as its measured use too)."""
        vmid = vmid_of(sid)
        cpus, memory = guest_stats(self.cache.guest(vmid) if vmid is not None else None)
        return ResourceStats(maxcpu=cpus, maxmem=memory, cpu=cpus, mem=memory)

    # --- the node's resources --------------------------------------------------------------

    def _vmid(self, sid: str) -> int:
        vmid = vmid_of(sid)
        if vmid is None:
            raise OSError(f"{sid}: only vm: resources run on this node's compute agent")
        return vmid

    def check_running(self, sid: str) -> bool:
        """Whether this node's agent runs the guest."""
        state = self.bridge.call(self.actions.power_state(self._vmid(sid)), self.timeouts.store * 2)
        return state is not None and state is not PowerState.STOPPED

    def start(self, sid: str) -> None:
        """Start the guest here under this node's lease token; a failure is logged."""
        try:
            self.bridge.call(self.actions.start(self._vmid(sid)), self.timeouts.action)
        except OSError as err:
            self.log("warning", f"start of {sid} failed: {err}")

    def shutdown(self, sid: str, timeout: int | None) -> None:
        """Stop the guest here; a failure is logged."""
        try:
            self.bridge.call(self.actions.shutdown(self._vmid(sid), timeout), self.timeouts.action)
        except OSError as err:
            self.log("warning", f"stop of {sid} failed: {err}")

    def migrate(self, sid: str, target: str, online: bool) -> bool:
        """Move the guest; offline moves stop it first (Proxmox's relocate)."""
        vmid = self._vmid(sid)
        try:
            if not online and self.check_running(sid):
                self.bridge.call(self.actions.shutdown(vmid, None), self.timeouts.action)
            moving = self.actions.migrate(
                vmid, target, online, capacity=self.capacity(target), guests=self.cache.guests()
            )
            self.bridge.call(moving, self.timeouts.action)
        except OSError as err:
            self.log("warning", f"migration of {sid} to {target} failed: {err}")
            return False
        return True


def _without_time(record: Any) -> Any:
    """A document with its timestamp zeroed, to compare contents."""
    return msgspec.structs.replace(record, timestamp=0.0)
