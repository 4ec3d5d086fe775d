"""The HA manager (CRM): one round computes every service's next state from the cluster's.

Only the elected manager runs a round. It reads node membership, the LRMs' results and modes,
the resource configuration and rules, and queued commands from its environment, moves each
service through Proxmox's state machine (``transitions``), fences nodes that left the quorate
partition, recovers their services elsewhere and publishes its status. Recovery and rebalance
targets come from :func:`select_service_node` over the shared CRS scores.
"""

from __future__ import annotations

import itertools
import secrets

from rucher.ha import disarm, transitions
from rucher.ha.env import HaEnvironment
from rucher.ha.model import (
    ClusterSettings,
    LrmResult,
    ManagerState,
    NodeCapacity,
    ResourceStats,
    ServiceConfig,
    ServiceData,
)
from rucher.ha.node_status import NodeStatus
from rucher.ha.rules import (
    CompiledRules,
    apply_group_failback,
    apply_negative,
    apply_positive,
    compile_rules,
    get_node_affinity,
    get_resource_affinity,
    groups_to_rules,
    is_allowed_on_node,
)
from rucher.ha.usage import Usage

VALID_STATES = frozenset(
    {
        "stopped",
        "request_stop",
        "request_start",
        "request_start_balance",
        "started",
        "fence",
        "recovery",
        "migrate",
        "relocate",
        "freeze",
        "error",
    }
)
_uids = itertools.count(1)
# Command ids must stay unique across manager fail-overs (each manager is its own process).
_RUN = secrets.token_hex(4)


def new_uid(state: str) -> str:
    """A fresh command id: the LRM reports each command's result under it."""
    return f"{state}-{_RUN}-{next(_uids)}"


class Manager:
    """The elected manager's state across rounds."""

    def __init__(self, env: HaEnvironment) -> None:
        """Take over the previous manager's published node and service state."""
        self.env = env
        old = env.read_manager_status()
        self.ns = NodeStatus(env, old.node_status)
        self.ss: dict[str, ServiceData] = old.service_status
        self.ms = ManagerState(
            master_node=env.nodename(), node_request=old.node_request, disarm=old.disarm
        )
        self.settings = ClusterSettings()
        self.scheduler: str | None = None
        self.rules = CompiledRules()
        self.usage = Usage("basic", [], self._capacity, self._stats)
        self.rebalance_hold: dict[str, int] = {}
        self.update_crs_mode()

    def _capacity(self, node: str) -> NodeCapacity:
        return self.env.node_capacity(node)

    def _stats(self, sid: str) -> ResourceStats:
        return self.env.resource_stats(sid)

    def update_crs_mode(self) -> None:
        """Read the datacenter settings; log a scheduler mode change."""
        self.settings = self.env.cluster_settings()
        self.ns.fence_delay = self.settings.fence_delay
        new = self.settings.crs_mode
        if self.scheduler is None:
            if new != "basic":
                self.env.log("info", f"using scheduler mode '{new}'")
        elif new != self.scheduler:
            self.env.log("info", f"switching scheduler mode from '{self.scheduler}' to '{new}'")
        self.scheduler = new

    def flush(self) -> None:
        """Publish the manager's status."""
        self.ms.node_status = self.ns.status
        self.ms.service_status = self.ss
        self.ms.timestamp = self.env.now()
        self.env.write_manager_status(self.ms)

    # --- usage and placement ---------------------------------------------------------------

    def recompute_usage(self) -> None:
        """Count every service on the online nodes it occupies."""
        mode = self.scheduler or "basic"
        self.usage = Usage(mode, self.ns.list_online_nodes(), self._capacity, self._stats)
        for sid in sorted(self.ss):
            data = self.ss[sid]
            self.usage.add_service(sid, data.state, data.node, data.target)

    def select_service_node(  # noqa: PLR0911
        self,
        sid: str,
        config: ServiceConfig,
        preference: str,
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        """Where ``sid`` should run; preference ``none`` (stay), ``best-score`` or ``try-next``.

        ``exclude``: nodes that refused the guest in this round (no room left there).
        """
        data = self.ss[sid]
        current = data.node
        online = set(self.usage.nodes)
        allowed, pri_nodes = get_node_affinity(self.rules, sid, online)
        if not pri_nodes:
            return None
        together, separate = get_resource_affinity(self.rules, sid, self.ss, online)
        if (
            preference == "none"
            and not config.failback
            and current in allowed
            and is_allowed_on_node(together, separate, current)
        ):
            return current
        if preference == "try-next":
            pri_nodes -= set(data.failed_nodes or ())
        apply_negative(separate, pri_nodes)
        apply_positive(together, pri_nodes)
        pri_nodes -= exclude
        fallback = data.maintenance_node
        if fallback is not None and fallback in pri_nodes:
            return fallback
        if preference == "none" and current in pri_nodes:
            return current
        scores = self.usage.scores(sid)
        nodes = sorted(pri_nodes, key=lambda node: (round(scores.get(node, 0.0), 9), node))
        if not nodes:
            return None
        if preference == "try-next" and current in nodes:
            index = nodes.index(current)
            if index < len(nodes) - 1:
                return nodes[index + 1]
        return nodes[0]

    # --- state changes ---------------------------------------------------------------------

    def change_state(self, sid: str, new_state: str, **params: str | int) -> None:
        """Move ``sid`` to ``new_state`` with a fresh command uid; log it in Proxmox's words."""
        data = self.ss[sid]
        old_state = data.state
        if old_state == new_state:
            raise RuntimeError(f"no state change for {sid}")
        if new_state not in VALID_STATES:
            raise ValueError(f"invalid CRM service state '{new_state}'")
        fresh = ServiceData(
            state=new_state,
            node=data.node,
            failed_nodes=data.failed_nodes,
            maintenance_node=data.maintenance_node,
        )
        for key in sorted(params):
            setattr(fresh, key, params[key])
        fresh.uid = new_uid(new_state)
        self.ss[sid] = fresh
        self.usage.remove_service(sid)
        self.usage.add_service(sid, fresh.state, fresh.node, fresh.target)
        text = ", ".join(f"{key} = {params[key]}" for key in sorted(params))
        suffix = f"  ({text})" if text else ""
        self.env.log(
            "info", f"service '{sid}': state changed from '{old_state}' to '{new_state}'{suffix}"
        )

    # --- the round -------------------------------------------------------------------------

    def read_lrm_status(self) -> tuple[dict[str, LrmResult], dict[str, str]]:
        """Every node's LRM results by uid, and its mode."""
        results: dict[str, LrmResult] = {}
        modes: dict[str, str] = {}
        for node in self.ns.list_nodes():
            status = self.env.read_lrm_status(node)
            modes[node] = status.mode or "active"
            for uid, result in status.results.items():
                results.setdefault(uid, result)
        return results, modes

    def manage(self) -> None:
        """One manager round."""
        env = self.env
        node_info = env.node_info()
        results, modes = self.read_lrm_status()
        self.ns.update(node_info, modes)
        if not self.ns.node_is_operational(env.nodename()):
            env.log("info", "master seems offline")
            return
        self.update_crs_mode()
        services = env.read_service_config()
        for sid in sorted(services):
            if sid in self.ss or services[sid].state == "ignored":
                continue
            config = services[sid]
            env.log("info", f"adding new service '{sid}' on node '{config.node}'")
            state = "request_start" if config.state == "started" else "request_stop"
            self.ss[sid] = ServiceData(state=state, node=config.node, uid=new_uid("started"))
        for sid in sorted(self.ss):
            if sid in services and services[sid].state != "ignored":
                continue
            reason = "ignored state requested" if sid in services else "no config"
            env.log("info", f"removing stale service '{sid}' ({reason})")
            del self.ss[sid]
        self.recompute_usage()
        config_rules = env.read_rules()
        apply_group_failback(config_rules, services)
        merged = groups_to_rules(config_rules, services)
        self.rules = compile_rules(merged, self.ns.list_nodes())
        commands = env.read_crm_commands()
        disarm.handle_commands(self, commands, services)
        if disarm.is_suspended(self, modes):
            self.flush()
            return
        transitions.auto_rebalance(self, services)
        self.run_state_machine(services, results, modes)
        disarm.after_round(self, modes)
        self.flush()

    def run_state_machine(  # noqa: PLR0912
        self,
        services: dict[str, ServiceConfig],
        results: dict[str, LrmResult],
        modes: dict[str, str],
    ) -> None:
        """Step every service until nothing changes; fence and recover along the way.

        While a ``disarm-ha`` waits for fencing to finish, only the services being fenced or
        recovered move on.
        """
        pending = self.ms.disarm
        only_fencing = pending is not None and not pending.rearm
        while True:
            repeat = False
            for sid in sorted(self.ss):
                if sid not in self.ss:
                    continue
                data = self.ss[sid]
                if only_fencing and data.state not in ("fence", "recovery"):
                    continue
                config = services.get(sid) or ServiceConfig(
                    sid=sid, node=data.node, state="disabled"
                )
                result = results.get(data.uid) if data.uid else None
                last = data.state
                transitions.step(self, sid, config, result, modes)
                data = self.ss[sid]
                mode = modes.get(data.node) if data.node else None
                if mode == "restart" and data.state in ("started", "stopped", "request_stop"):
                    self.change_state(sid, "freeze")
                if self.ss[sid].state != last:
                    repeat = True
            fenced: dict[str, bool] = {}
            for sid in sorted(self.ss):
                data = self.ss[sid]
                if data.state != "fence":
                    continue
                if data.node not in fenced:
                    fenced[data.node] = self.ns.fence_node(data.node)
                if fenced[data.node]:
                    self.change_state(sid, "recovery")
                    repeat = True
            for node in sorted(self.ns.status):
                if node in fenced or self.ns.get_node_state(node) != "fence":
                    continue
                self.env.log(
                    "notice",
                    f"node '{node}' in fence state but no services to-fence! admin interference?!",
                )
                if self.ns.fence_node(node):
                    repeat = True
            if not repeat:
                break
