"""The manager's view of the cluster nodes: online, maintenance, unknown, fence, gone.

A node that leaves the quorate partition goes ``unknown``; after the fence delay its services go
to ``fence`` and the node with them; the fence succeeds once the manager holds the node's agent
lock, which only expires after the node's own watchdog must have stopped its guests.
"""

from __future__ import annotations

from rucher.ha.env import HaEnvironment

FENCE_DELAY = 60.0
GONE_DELETE_DELAY = 3600.0


class NodeStatus:
    """Node states and the last time each node was seen online."""

    def __init__(self, env: HaEnvironment, status: dict[str, str]) -> None:
        """Start from the previous manager's node states."""
        self.env = env
        self.status = status
        self.last_online: dict[str, float] = {}
        self.members_online: set[str] = set()
        self.fence_delay = FENCE_DELAY

    def get_node_state(self, node: str) -> str:
        """The node's state; a node never seen is ``unknown``."""
        return self.status.setdefault(node, "unknown")

    def node_is_online(self, node: str) -> bool:
        """Whether the node is online (maintenance is not)."""
        return self.get_node_state(node) == "online"

    def node_is_operational(self, node: str) -> bool:
        """Whether the node is online or in maintenance (still a working member)."""
        return self.get_node_state(node) in ("online", "maintenance")

    def node_is_offline_delayed(self, node: str, delay: float | None = None) -> bool:
        """Whether the node has been out of the quorate partition for at least ``delay``.

        Without ``delay``, the fence delay (``FENCE_DELAY`` unless the settings change it).
        """
        if delay is None:
            delay = self.fence_delay
        if self.get_node_state(node) == "online" or node in self.members_online:
            # A member online (in maintenance, say) is never offline, even with no fence delay.
            return False
        now = self.env.now()
        last = self.last_online.get(node)
        if last is None:
            self.last_online[node] = now
            return False
        return now - last >= delay

    def list_nodes(self) -> list[str]:
        """Every known node, sorted."""
        return sorted(self.status)

    def list_online_nodes(self) -> list[str]:
        """The online nodes, sorted."""
        return [node for node in sorted(self.status) if self.status[node] == "online"]

    def _set(self, node: str, state: str) -> None:
        last = self.get_node_state(node)
        if last == state:
            return
        self.status[node] = state
        self.env.log("info", f"node '{node}': state changed from '{last}' => '{state}'")

    def update(self, node_info: dict[str, bool], lrm_modes: dict[str, str]) -> None:  # noqa: PLR0912
        """Apply the current membership and the nodes' LRM modes to the node states."""
        now = self.env.now()
        self.members_online = {node for node, online in node_info.items() if online}
        for node in sorted(node_info):
            if not node_info[node]:
                continue
            self.last_online[node] = now
            mode = lrm_modes.get(node, "unknown")
            state = self.get_node_state(node)
            if state == "online":
                if mode == "maintenance":
                    self._set(node, "maintenance")
            elif state == "maintenance":
                if mode != "maintenance":
                    self._set(node, "online")
            elif state in ("unknown", "gone"):
                self._set(node, "online")
        for node in sorted(self.status):
            if node_info.get(node):
                continue
            state = self.get_node_state(node)
            if state == "online":
                self._set(node, "unknown")
            elif state == "maintenance":
                if lrm_modes.get(node, "unknown") != "maintenance":
                    self._set(node, "unknown")
            elif state == "unknown":
                if node not in node_info:
                    self._set(node, "gone")
            elif state == "gone" and self.node_is_offline_delayed(node, GONE_DELETE_DELAY):
                self.last_online.pop(node, None)
                del self.status[node]
                self.env.log(
                    "notice", f"deleting gone node '{node}', not a cluster member anymore."
                )

    def fence_node(self, node: str) -> bool:
        """Start (or continue) fencing ``node``; True once its agent lock is ours."""
        if self.get_node_state(node) != "fence":
            self._set(node, "fence")
            self.env.log("email", f"FENCE: Try to fence node '{node}'")
        if not self.env.get_agent_lock(node):
            return False
        message = f"fencing: acknowledged - got agent lock for node '{node}'"
        self.env.log("info", message)
        self._set(node, "unknown")
        self.env.log("email", f"SUCCEED: {message}")
        return True
