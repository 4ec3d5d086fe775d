"""The simulated cluster: nodes with power, network and watchdogs, locks, guests, a virtual clock.

Each round every powered node runs one CRM and one LRM iteration (one virtual second each), the
watchdogs are checked after every step, and a round lasts max(20, 2 x nodes) seconds. A new slot
of the command list is applied every fifth round, as in Proxmox's test harness; the run ends
500 seconds after the last command.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from rucher.ha.crm import Crm
from rucher.ha.lrm import Lrm
from rucher.ha.model import LrmStatus, ResourceStats, ServiceConfig, parse_sid
from rucher.ha.sim.env import SimEnv
from rucher.ha.sim.scenario import Scenario

WATCHDOG_TIMEOUT = 60
LOCK_TIMEOUT = 120
MAX_SIM_TIME = 10000
CFS_ERROR = "cfs connection refused - not mounted?"


@dataclass
class Node:
    """One simulated node."""

    name: str
    power: bool = False
    network: bool = False
    maxcpu: float = 0.0
    maxmem: float = 0.0
    shutdown: str | None = None
    cfs: dict[str, bool] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    crm: Crm | None = None
    lrm: Lrm | None = None
    crm_stop: bool = False
    lrm_restart: bool = False
    version: str = ""


class Hardware:
    """The simulated cluster and its command language."""

    def __init__(self, scenario: Scenario, emit: Callable[[str], None] = print) -> None:
        """Build the cluster a scenario describes; ``emit`` receives each log line."""
        self.emit = emit
        self.time = 0
        self.lines: list[str] = []
        self.nodes: dict[str, Node] = {}
        for name in sorted(scenario.hardware):
            raw = scenario.hardware[name]
            self.nodes[name] = Node(
                name=name,
                power=raw.get("power") == "on",
                network=raw.get("network") == "on",
                maxcpu=float(raw.get("maxcpu", 0)),
                maxmem=float(raw.get("maxmem", 0)),
            )
        self.services = scenario.services
        self.manager_status = scenario.manager_status
        self.lrm_status: dict[str, LrmStatus] = {}
        self.rules = scenario.rules
        self.settings = scenario.settings
        self.static_stats = scenario.static_stats
        self.dynamic_stats = scenario.dynamic_stats
        self.commands = list(scenario.commands)
        self.crm_commands: list[str] = []
        self.locks: dict[str, tuple[str, float]] = {}
        self.watchdogs: dict[str, tuple[str, float]] = {}
        self._wd_ids = itertools.count(1)
        self.fail_tries: dict[tuple[str, str], int] = {}
        self.skip: dict[str, int] = {}

    # --- log -------------------------------------------------------------------------------

    def log(self, level: str, message: str, source: str = "hardware") -> None:
        """One log line in Proxmox's format."""
        line = f"{level[:4]:<5} {self.time:5d} {source:>12}: {message}"
        self.lines.append(line)
        self.emit(line)

    # --- membership, locks, watchdogs --------------------------------------------------------

    def node_info(self) -> dict[str, bool]:
        """Online members of the quorate partition (none when there is no quorum)."""
        online = {name: node.power and node.network for name, node in self.nodes.items()}
        quorate = sum(online.values()) > len(online) // 2
        return {name: up and quorate for name, up in online.items()}

    def check_cfs(self, node: str, kind: str) -> None:
        """Fail like an unmounted cluster file system when the scenario says so."""
        if not self.nodes[node].cfs.get(kind, True):
            raise OSError(CFS_ERROR)

    def get_lock(self, env: SimEnv, name: str, release: bool = False) -> bool:  # noqa: PLR0911
        """Take, renew or release a cluster lock that expires 120 s after its last renewal."""
        if not env.quorate():
            return False
        now = self.time
        held = self.locks.get(name)
        if release:
            if held is None:
                return False
            owner, when = held
            if now - when > LOCK_TIMEOUT:
                return True
            if owner == env.node:
                del self.locks[name]
                return True
            return False
        if held is not None:
            owner, when = held
            if now - when <= LOCK_TIMEOUT:
                if owner == env.node:
                    self.locks[name] = (owner, now)
                    return True
                return False
        env.log("info", f"got lock '{name}'")
        self.locks[name] = (env.node, now)
        return True

    def watchdog_open(self, node: str) -> str:
        """Arm a watchdog on ``node``."""
        handle = f"WD:{node}:{next(self._wd_ids)}"
        self.watchdogs[handle] = (node, self.time)
        return handle

    def watchdog_update(self, handle: str) -> None:
        """Feed a watchdog; an expired one cannot be fed."""
        node, when = self.watchdogs[handle]
        if self.time - when > WATCHDOG_TIMEOUT:
            raise RuntimeError("watchdog expired")
        self.watchdogs[handle] = (node, self.time)

    def watchdog_close(self, handle: str) -> None:
        """Disarm a watchdog."""
        self.watchdogs.pop(handle, None)

    def watchdog_expired(self, node: str) -> bool:
        """Whether a watchdog of ``node`` ran out (it is removed then)."""
        expired = False
        for handle, (owner, when) in list(self.watchdogs.items()):
            if owner == node and self.time - when > WATCHDOG_TIMEOUT:
                expired = True
                del self.watchdogs[handle]
        return expired

    # --- services and guests ---------------------------------------------------------------

    def service_config_copy(self) -> dict[str, ServiceConfig]:
        """Private copies of the resources' configuration."""
        return {sid: copy.copy(config) for sid, config in self.services.items()}

    def change_service_location(self, sid: str, current: str, new: str) -> None:
        """Move a resource's configuration between nodes."""
        config = self.services.get(sid)
        if config is None:
            raise KeyError(f"no such service '{sid}'")
        if config.node != current:
            raise ValueError(
                f"current_node for '{sid}' does not match ({current} != {config.node})"
            )
        config.node = new

    def resource_stats(self, sid: str) -> ResourceStats:
        """Configured and measured CPU and memory of a resource."""
        static = self.static_stats.get(sid, {})
        dynamic = self.dynamic_stats.get(sid, {})
        return ResourceStats(
            maxcpu=float(static.get("maxcpu", 0.0)),
            maxmem=float(static.get("maxmem", 0.0)),
            cpu=float(dynamic.get("cpu", 0.0)),
            mem=float(dynamic.get("mem", 0.0)),
        )

    def _fail_digit(self, sid: str, index: int) -> int:
        kind, digits = parse_sid(sid)
        if kind != "fa" or len(digits) <= index:
            return 0
        return int(digits[index])

    def _fails(self, sid: str, what: str, index: int) -> bool:
        needed = self._fail_digit(sid, index)
        tries = self.fail_tries.get((sid, what), 0)
        self.fail_tries[(sid, what)] = tries + 1
        return tries < needed

    def start_guest(self, node: str, sid: str) -> None:
        """Start a guest (the ``fa:`` test resources fail as their id says).

        In ``fa:abcdef`` b is how many starts fail, c how many migrations, d non-zero makes
        stops fail, and f, when non-zero, limits the start failures to node f.
        """
        only_on = self._fail_digit(sid, 5)
        if only_on and node != f"node{only_on}":
            self.nodes[node].running.add(sid)
            return
        if not self._fails(sid, "start", 1):
            self.nodes[node].running.add(sid)

    def stop_guest(self, node: str, sid: str) -> None:
        """Stop a guest (``fa:`` resources with a fourth digit never stop)."""
        if self._fail_digit(sid, 3) == 0:
            self.nodes[node].running.discard(sid)

    def migrate_guest(self, env: SimEnv, sid: str, target: str, online: bool) -> bool:
        """Migrate (running, online) or relocate a guest; False when it did not move."""
        node = env.node
        if self._fails(sid, "migrate", 2):
            return False
        running = sid in self.nodes[node].running
        if online and running:
            env.log("info", f"service {sid} - start migrate to node '{target}'")
            self.change_service_location(sid, node, target)
            env.log("info", f"service {sid} - end migrate to node '{target}'")
            self.nodes[node].running.discard(sid)
            self.nodes[target].running.add(sid)
            return True
        if running:
            env.log("info", f"stopping service {sid} (relocate)")
            self.stop_guest(node, sid)
            if sid in self.nodes[node].running:
                return False
            env.log("info", f"service status {sid} stopped")
        env.log("info", f"service {sid} - start relocate to node '{target}'")
        self.change_service_location(sid, node, target)
        env.log("info", f"service {sid} - end relocate to node '{target}'")
        return True

    # --- daemons ---------------------------------------------------------------------------

    def power_on(self, node: Node) -> None:
        """Start the node's CRM and LRM."""
        if node.crm is None:
            node.crm = Crm(SimEnv(self, node.name, "crm"))
        if node.lrm is None:
            node.lrm = Lrm(SimEnv(self, node.name, "lrm"))
        node.lrm_restart = False
        node.cfs = {}

    def power_off(self, node: Node) -> None:
        """Kill the node's daemons, watchdogs and guests."""
        if node.crm is not None:
            node.crm.env.log("info", "killed by poweroff")
            node.crm = None
        if node.lrm is not None:
            node.lrm.env.log("info", "killed by poweroff")
            node.lrm = None
            node.lrm_restart = False
        for handle, (owner, _) in list(self.watchdogs.items()):
            if owner == node.name:
                del self.watchdogs[handle]
        node.running.clear()
