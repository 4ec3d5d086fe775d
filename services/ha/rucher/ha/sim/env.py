"""The simulator's implementation of the HA environment for one node's CRM or LRM."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rucher.ha.model import (
    ClusterSettings,
    LrmStatus,
    ManagerState,
    NodeCapacity,
    ResourceStats,
    RulesConfig,
    ServiceConfig,
)

if TYPE_CHECKING:
    from rucher.ha.sim.hardware import Hardware


class SimEnv:
    """One daemon's view of the simulated cluster (``node/crm`` or ``node/lrm`` in the log)."""

    def __init__(self, hardware: Hardware, node: str, role: str) -> None:
        """Bind to ``node`` and log as ``node/role``."""
        self.hw = hardware
        self.node = node
        self.role = role

    def nodename(self) -> str:
        """This node's name."""
        return self.node

    def now(self) -> float:
        """The virtual clock."""
        return float(self.hw.time)

    def sleep(self, seconds: float) -> None:
        """Time only advances between daemon rounds in the simulator."""

    def log(self, level: str, message: str) -> None:
        """Log as ``node/role``."""
        self.hw.log(level, message, f"{self.node}/{self.role}")

    def quorate(self) -> bool:
        """Whether this node is in the quorate partition."""
        return self.hw.node_info().get(self.node, False)

    def node_info(self) -> dict[str, bool]:
        """Members and whether each is online in the quorate partition."""
        return self.hw.node_info()

    def get_manager_lock(self) -> bool:
        """The cluster-wide manager lock."""
        return self.hw.get_lock(self, "ha_manager_lock")

    def release_manager_lock(self) -> bool:
        """Release the manager lock."""
        return self.hw.get_lock(self, "ha_manager_lock", release=True)

    def get_agent_lock(self, node: str | None = None) -> bool:
        """A node's agent lock."""
        return self.hw.get_lock(self, f"ha_agent_{node or self.node}_lock")

    def release_agent_lock(self) -> bool:
        """Release this node's agent lock."""
        return self.hw.get_lock(self, f"ha_agent_{self.node}_lock", release=True)

    def watchdog_open(self) -> str:
        """Arm this node's watchdog."""
        return self.hw.watchdog_open(self.node)

    def watchdog_update(self, handle: str) -> None:
        """Feed it."""
        self.hw.watchdog_update(handle)

    def watchdog_close(self, handle: str) -> None:
        """Disarm it."""
        self.hw.watchdog_close(handle)

    def read_manager_status(self) -> ManagerState:
        """A copy of the published manager status."""
        self.hw.check_cfs(self.node, "rw")
        return self.hw.manager_status.copy()

    def write_manager_status(self, status: ManagerState) -> None:
        """Publish the manager status."""
        self.hw.check_cfs(self.node, "rw")
        self.hw.manager_status = status.copy()

    def read_lrm_status(self, node: str | None = None) -> LrmStatus:
        """A node's LRM status."""
        return self.hw.lrm_status.get(node or self.node, LrmStatus())

    def write_lrm_status(self, status: LrmStatus) -> None:
        """Publish this node's LRM status."""
        self.hw.check_cfs(self.node, "rw")
        self.hw.lrm_status[self.node] = status

    def read_service_config(self) -> dict[str, ServiceConfig]:
        """Copies of the resources' configuration."""
        return self.hw.service_config_copy()

    def update_service_config(self, sid: str, state: str) -> None:
        """Change a resource's requested state."""
        if sid in self.hw.services:
            self.hw.services[sid].state = state

    def steal_service(self, sid: str, current_node: str, new_node: str) -> None:
        """Move a fenced resource to its recovery node."""
        self.hw.change_service_location(sid, current_node, new_node)

    def read_rules(self) -> RulesConfig:
        """The configured rules and groups."""
        return self.hw.rules

    def read_crm_commands(self) -> list[str]:
        """Take the queued manager commands."""
        commands, self.hw.crm_commands = self.hw.crm_commands, []
        return commands

    def cluster_settings(self) -> ClusterSettings:
        """The datacenter settings."""
        return self.hw.settings

    def is_node_shutdown(self) -> tuple[bool, bool]:
        """Whether this node shuts down, and whether it reboots."""
        target = self.hw.nodes[self.node].shutdown
        return target is not None, target == "reboot"

    def has_crm_commands(self) -> bool:
        """Whether manager commands are queued."""
        return bool(self.hw.crm_commands)

    def node_capacity(self, node: str) -> NodeCapacity:
        """A node's CPUs and memory."""
        hw = self.hw.nodes[node]
        return NodeCapacity(maxcpu=hw.maxcpu, maxmem=hw.maxmem)

    def resource_stats(self, sid: str) -> ResourceStats:
        """A resource's configured and measured use."""
        return self.hw.resource_stats(sid)

    def check_running(self, sid: str) -> bool:
        """Whether the guest runs here."""
        return sid in self.hw.nodes[self.node].running

    def start(self, sid: str) -> None:
        """Start the guest here."""
        self.hw.start_guest(self.node, sid)

    def shutdown(self, sid: str, timeout: int | None) -> None:
        """Stop the guest here."""
        self.hw.stop_guest(self.node, sid)

    def migrate(self, sid: str, target: str, online: bool) -> bool:
        """Move the guest (and its configuration) to ``target``."""
        return self.hw.migrate_guest(self, sid, target, online)
