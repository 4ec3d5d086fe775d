"""The environment interface: everything the HA decision core needs from the world.

The manager (CRM) and the node part (LRM) never touch a clock, a lock service, a store or a
hypervisor directly; they call one :class:`HaEnvironment` bound to their node. The simulator
implements it over a virtual clock and in-memory "hardware"; the live service implements it
over leases, the cluster store and the compute agents.
"""

from __future__ import annotations

from typing import Protocol

from rucher.ha.model import (
    ClusterSettings,
    LrmStatus,
    ManagerState,
    NodeCapacity,
    ResourceStats,
    RulesConfig,
    ServiceConfig,
)


class NoRoomError(OSError):
    """A recovery node refused the guest: its room went since the choice (try the next)."""


class HaEnvironment(Protocol):
    """The world as one node's CRM or LRM sees it; every call may be answered from a snapshot."""

    def nodename(self) -> str:
        """The name of the node this instance runs on."""
        ...

    def now(self) -> float:
        """The current time in seconds (virtual in the simulator, monotonic-ish in real life)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait (the simulator only accounts for the time)."""
        ...

    def log(self, level: str, message: str) -> None:
        """Record one log line in Proxmox's wording."""
        ...

    # --- membership and locks (leases) -----------------------------------------------------

    def quorate(self) -> bool:
        """Whether this node is a member of the quorate partition."""
        ...

    def node_info(self) -> dict[str, bool]:
        """Every cluster member and whether it is online in the quorate partition."""
        ...

    def get_manager_lock(self) -> bool:
        """Take or renew the cluster-wide manager lock; False if another node holds it."""
        ...

    def release_manager_lock(self) -> bool:
        """Give the manager lock up voluntarily (graceful shutdown only)."""
        ...

    def get_agent_lock(self, node: str | None = None) -> bool:
        """Take or renew a node's agent lock (the manager takes a dead node's to fence it)."""
        ...

    def release_agent_lock(self) -> bool:
        """Give this node's agent lock up (only with no active HA service left)."""
        ...

    def watchdog_open(self) -> str:
        """Arm this node's watchdog; it fires unless updated within its timeout."""
        ...

    def watchdog_update(self, handle: str) -> None:
        """Feed the watchdog."""
        ...

    def watchdog_close(self, handle: str) -> None:
        """Disarm the watchdog (only when no HA service can run unprotected)."""
        ...

    # --- cluster state ---------------------------------------------------------------------

    def read_manager_status(self) -> ManagerState:
        """The manager's last published status (a private copy)."""
        ...

    def write_manager_status(self, status: ManagerState) -> None:
        """Publish the manager's status."""
        ...

    def read_lrm_status(self, node: str | None = None) -> LrmStatus:
        """A node's last published LRM status (this node's when ``node`` is None)."""
        ...

    def write_lrm_status(self, status: LrmStatus) -> None:
        """Publish this node's LRM status."""
        ...

    def read_service_config(self) -> dict[str, ServiceConfig]:
        """The HA resources' configuration, defaults filled in."""
        ...

    def update_service_config(self, sid: str, state: str) -> None:
        """Change a resource's requested state (the manager does it for ``stop`` commands)."""
        ...

    def steal_service(self, sid: str, current_node: str, new_node: str) -> None:
        """Move a fenced resource's configuration to its recovery node.

        Raises :class:`NoRoomError` when the node cannot take the guest after all (the manager then
        tries the next node).
        """
        ...

    def read_rules(self) -> RulesConfig:
        """Node- and resource-affinity rules and the older groups."""
        ...

    def read_crm_commands(self) -> list[str]:
        """Take the queued manager commands (migrate, relocate, stop, maintenance, disarm)."""
        ...

    def cluster_settings(self) -> ClusterSettings:
        """Datacenter-wide HA and CRS settings."""
        ...

    def is_node_shutdown(self) -> tuple[bool, bool]:
        """Whether this node is shutting down, and whether that shutdown is a reboot."""
        ...

    def has_crm_commands(self) -> bool:
        """Whether manager commands are queued (they wake an idle manager)."""
        ...

    def node_capacity(self, node: str) -> NodeCapacity:
        """A node's CPUs and memory, for the static and dynamic schedulers."""
        ...

    def resource_stats(self, sid: str) -> ResourceStats:
        """A resource's configured and measured CPU and memory use."""
        ...

    # --- the node's resources --------------------------------------------------------------

    def check_running(self, sid: str) -> bool:
        """Whether the guest runs on this node."""
        ...

    def start(self, sid: str) -> None:
        """Start the guest on this node (a fencing token rides along in real life)."""
        ...

    def shutdown(self, sid: str, timeout: int | None) -> None:
        """Stop the guest on this node, hard when ``timeout`` is 0."""
        ...

    def migrate(self, sid: str, target: str, online: bool) -> bool:
        """Move the guest to ``target`` (live when ``online``); True if it moved."""
        ...
