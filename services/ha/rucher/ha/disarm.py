"""Manager commands, and ``disarm-ha``/``arm-ha``: HA standing down without fencing anyone.

Disarming waits until no service is being fenced, then freezes every service (mode ``freeze``)
or stops tracking them (mode ``ignore``); the LRMs release their agent locks and watchdogs, and
the manager reports the stack fully disarmed once no online node's LRM is active any more.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from rucher.ha.model import DisarmState, ServiceConfig
from rucher.ha.rules import affine_resources

if TYPE_CHECKING:
    from rucher.ha.manager import Manager

MOVE = re.compile(r"^(migrate|relocate)\s+(\S+)\s+(\S+)$")
STOP = re.compile(r"^stop\s+(\S+)\s+(\S+)$")
MAINTENANCE = re.compile(r"^(enable|disable)-node-maintenance\s+(\S+)$")
DISARM = re.compile(r"^disarm-ha\s+(freeze|ignore)$")


def _execute_migration(manager: Manager, command: str, task: str, sid: str, target: str) -> None:
    env = manager.env
    together, separate = affine_resources(manager.rules, sid)
    for other in sorted(separate):
        data = manager.ss.get(other)
        if data is None:
            continue
        if data.node and data.node != target:
            continue
        if data.target and data.target != target:
            continue
        env.log(
            "err",
            f"crm command '{command}' error - service '{other}' on node '{target}' in"
            f" negative affinity with service '{sid}'",
        )
        return
    env.log("info", f"got crm command: {command}")
    manager.ss[sid].cmd = [task, target]
    for other in sorted(together):
        data = manager.ss.get(other)
        if data is None or target in (data.node, data.target):
            continue
        env.log(
            "info",
            f"crm command '{command}' - {task} service '{other}' to node '{target}'"
            f" (service '{other}' in positive affinity with service '{sid}')",
        )
        data.cmd = [task, target]


def _adopt_moves(manager: Manager, services: dict[str, ServiceConfig]) -> None:
    """Take over where guests were moved by hand while HA did not track them."""
    for sid in sorted(manager.ss):
        data = manager.ss[sid]
        config = services.get(sid)
        if config is not None and config.node != data.node:
            manager.env.log(
                "info",
                f"service '{sid}': updating node '{data.node}' => '{config.node}' "
                "(changed while disarmed)",
            )
            data.node = config.node


def handle_commands(  # noqa: PLR0912
    manager: Manager, commands: list[str], services: dict[str, ServiceConfig]
) -> None:
    """Apply the queued manager commands, in order."""
    env = manager.env
    ns = manager.ns
    for raw in commands:
        command = raw.strip()
        if match := MOVE.match(command):
            task, sid, node = match.groups()
            data = manager.ss.get(sid)
            if data is None:
                env.log("err", f"crm command error - no such service: {command}")
            elif not ns.node_is_online(node):
                env.log("err", f"crm command error - node not online: {command}")
            elif node == data.node:
                env.log("info", f"ignore crm command - service already on target node: {command}")
            else:
                _execute_migration(manager, command, task, sid, node)
        elif match := STOP.match(command):
            sid, timeout = match.groups()
            if sid in manager.ss:
                env.log("info", f"got crm command: {command}")
                manager.ss[sid].cmd = ["stop", timeout]
            else:
                env.log("err", f"crm command error - no such service: {command}")
        elif match := MAINTENANCE.match(command):
            action, node = match.groups()
            state = ns.get_node_state(node)
            if action == "enable":
                if state == "online":
                    manager.ms.node_request.setdefault(node, {})["maintenance"] = True
                elif state == "maintenance":
                    env.log(
                        "info",
                        f"ignoring crm command - node {node} is already in maintenance state",
                    )
                else:
                    env.log("err", f"crm command error - node not online: {command}")
            else:
                if state != "maintenance":
                    env.log(
                        "warn",
                        f"clearing maintenance of node {node} requested, but it's in state {state}",
                    )
                manager.ms.node_request.get(node, {}).pop("maintenance", None)
        elif match := DISARM.match(command):
            env.log("info", f"got crm command: {command}")
            if manager.ms.disarm is None:
                manager.ms.disarm = DisarmState(mode=match.group(1))
        elif command == "arm-ha":
            env.log("info", f"got crm command: {command}")
            if manager.ms.disarm is not None:
                manager.ms.disarm.rearm = True
                _adopt_moves(manager, services)
        else:
            env.log("err", f"unable to parse crm command: {command}")


def is_suspended(manager: Manager, modes: dict[str, str]) -> bool:
    """Whether the service state machine stands still this round (HA disarmed)."""
    disarm = manager.ms.disarm
    if disarm is None or disarm.rearm:
        return False
    env = manager.env
    if not disarm.applied:
        for sid in sorted(manager.ss):
            state = manager.ss[sid].state
            if state in ("fence", "recovery"):
                env.log("warning", f"deferring disarm - service '{sid}' is in '{state}' state")
                return False
        for sid in sorted(manager.ss):
            data = manager.ss[sid]
            if disarm.mode == "freeze":
                if data.state != "freeze":
                    env.log("info", f"disarm: freezing service '{sid}' (was '{data.state}')")
                    data.state = "freeze"
            else:
                env.log("info", f"disarm: suspending HA tracking for service '{sid}'")
        disarm.applied = True
    if not disarm.disarmed:
        active = [
            node
            for node in manager.ns.list_online_nodes()
            if env.read_lrm_status(node).state == "active"
        ]
        if not active:
            env.log("info", "all LRMs disarmed, HA stack is now fully disarmed")
            env.log("info", "HA stack fully disarmed, releasing CRM watchdog")
            disarm.disarmed = True
    return True


def after_round(manager: Manager, modes: dict[str, str]) -> None:
    """Finish an ``arm-ha`` request once the round ran armed."""
    disarm = manager.ms.disarm
    if disarm is not None and disarm.rearm:
        manager.env.log("info", "re-arming HA stack")
        manager.ms.disarm = None
