"""The service state machine: each state's next state, as Proxmox's manager computes it.

Every function reads the service's configuration (``config``), its status and the LRM's result
for its current command, and changes state only through ``Manager.change_state``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rucher.ha.env import NoRoomError
from rucher.ha.model import ExitCode, LrmResult, ServiceConfig

if TYPE_CHECKING:
    from rucher.ha.manager import Manager


def step(
    manager: Manager,
    sid: str,
    config: ServiceConfig,
    result: LrmResult | None,
    modes: dict[str, str],
) -> None:
    """Advance one service by one state."""
    state = manager.ss[sid].state
    if state == "stopped":
        next_stopped(manager, sid, config)
    elif state == "started":
        next_started(manager, sid, config, result)
    elif state == "request_start":
        next_request_start(manager, sid, config)
    elif state in ("migrate", "relocate", "request_start_balance"):
        next_migrate_relocate(manager, sid, config, result)
    elif state == "recovery":
        next_recovery(manager, sid, config)
    elif state == "request_stop":
        next_request_stop(manager, sid, result)
    elif state == "freeze":
        data = manager.ss[sid]
        if modes.get(data.node) == "active":
            manager.change_state(sid, "started" if config.state == "started" else "request_stop")
    elif state == "error" and config.state == "disabled":
        manager.ss[sid].failed_nodes = None
        manager.change_state(sid, "stopped")


def next_request_stop(manager: Manager, sid: str, result: LrmResult | None) -> None:
    """Stopped once the LRM reports success; error on failure; fence if the node is lost."""
    data = manager.ss[sid]
    if result is not None:
        if result.exit_code == ExitCode.SUCCESS:
            manager.change_state(sid, "stopped")
        else:
            manager.env.log("err", f"service '{sid}' stop failed (exit code {result.exit_code})")
            manager.change_state(sid, "error")
        return
    if manager.ns.node_is_offline_delayed(data.node):
        manager.change_state(sid, "fence")


def next_migrate_relocate(
    manager: Manager, sid: str, config: ServiceConfig, result: LrmResult | None
) -> None:
    """Land on the target once the move succeeded; stay on the source when it failed."""
    data = manager.ss[sid]
    env = manager.env
    if result is not None:
        requested = "started" if config.state == "started" else "request_stop"
        code = result.exit_code
        if code == ExitCode.SUCCESS:
            manager.change_state(sid, requested, node=data.target or data.node)
            return
        if code == ExitCode.EWRONG_NODE:
            env.log("err", f"service '{sid}' - migration failed: service registered on wrong node!")
            manager.change_state(sid, "error")
        elif code == ExitCode.IGNORED:
            env.log(
                "info",
                f"service '{sid}' - rebalance-on-start request ignored - service already running",
            )
            manager.change_state(sid, requested, node=data.node)
        else:
            env.log("err", f"service '{sid}' - migration failed (exit code {code})")
            manager.change_state(sid, requested, node=data.node)
            return
    data = manager.ss[sid]
    if manager.ns.node_is_offline_delayed(data.node):
        manager.change_state(sid, "fence")


def next_stopped(manager: Manager, sid: str, config: ServiceConfig) -> None:
    """Carry out a queued move, start when requested, fence if the node is lost."""
    data = manager.ss[sid]
    env = manager.env
    ns = manager.ns
    if data.node != config.node:
        env.log("info", f"fixup service '{sid}' location ({data.node} => {config.node})")
        data.node = config.node
    if data.cmd:
        command = data.cmd[0]
        if command in ("migrate", "relocate"):
            target = data.cmd[1]
            if not ns.node_is_online(target):
                env.log(
                    "err", f"ignore service '{sid}' {command} request - node '{target}' not online"
                )
            elif data.node == target:
                env.log(
                    "info",
                    f"ignore service '{sid}' {command} request - "
                    f"service already on node '{target}'",
                )
            else:
                data.cmd = None
                manager.change_state(sid, command, node=data.node, target=target)
                return
        elif command == "stop":
            env.log("info", f"ignore service '{sid}' {command} request - service already stopped")
        else:
            env.log("err", f"unknown command '{command}' for service '{sid}'")
        data.cmd = None
    if config.state == "disabled":
        return
    if ns.node_is_offline_delayed(data.node) and ns.get_node_state(data.node) != "maintenance":
        manager.change_state(sid, "fence")
        return
    if config.state == "stopped":
        return
    if config.state == "started":
        manager.change_state(sid, "request_start", node=data.node)
        return
    env.log("err", f"service '{sid}' - unknown state '{config.state}' in service configuration")


def next_request_start(manager: Manager, sid: str, config: ServiceConfig) -> None:
    """Start where it is, or (rebalance on start) on the best-scored node."""
    data = manager.ss[sid]
    current = data.node
    if manager.settings.rebalance_on_start:
        selected = manager.select_service_node(sid, config, "best-score")
        if selected is not None:
            which = "new" if selected != current else "current"
            manager.env.log(
                "info", f"service {sid}: re-balance selected {which} node {selected} for startup"
            )
            if selected != current:
                manager.change_state(sid, "request_start_balance", node=current, target=selected)
                return
    manager.change_state(sid, "started", node=current)


def _record_failure(manager: Manager, sid: str, node: str) -> list[str]:
    data = manager.ss[sid]
    if data.failed_nodes is None:
        data.failed_nodes = []
    data.failed_nodes.append(node)
    return data.failed_nodes


def _run_command(manager: Manager, sid: str) -> None:
    data = manager.ss[sid]
    env = manager.env
    assert data.cmd is not None
    command, argument = data.cmd[0], data.cmd[1]
    data.cmd = None
    if command in ("migrate", "relocate"):
        if not manager.ns.node_is_online(argument):
            env.log(
                "err", f"ignore service '{sid}' {command} request - node '{argument}' not online"
            )
        elif data.node == argument:
            env.log(
                "info",
                f"ignore service '{sid}' {command} request - service already on node '{argument}'",
            )
        else:
            env.log("info", f"{command} service '{sid}' to node '{argument}'")
            manager.change_state(sid, command, node=data.node, target=argument)
    elif command == "stop":
        timeout = int(argument)
        if timeout == 0:
            env.log("info", f"request immediate service hard-stop for service '{sid}'")
        else:
            env.log("info", f"request graceful stop with timeout '{timeout}' for service '{sid}'")
        manager.change_state(sid, "request_stop", timeout=timeout)
        env.update_service_config(sid, "stopped")
    else:
        env.log("err", f"unknown command '{command}' for service '{sid}'")


def next_started(  # noqa: PLR0911, PLR0912, PLR0915
    manager: Manager, sid: str, config: ServiceConfig, result: LrmResult | None
) -> None:
    """Keep it running: stop on request, move on command, relocate after failed starts."""
    data = manager.ss[sid]
    env = manager.env
    ns = manager.ns
    if not ns.node_is_online(data.node):
        if ns.node_is_offline_delayed(data.node):
            manager.change_state(sid, "fence")
        if ns.get_node_state(data.node) != "maintenance":
            return
        data = manager.ss[sid]
        data.maintenance_node = data.node
    if config.state in ("disabled", "stopped"):
        manager.change_state(sid, "request_stop")
        return
    if config.state != "started":
        env.log("err", f"service '{sid}' - unknown state '{config.state}' in service configuration")
        return
    if data.cmd:
        _run_command(manager, sid)
        return
    preference = "none"
    if result is not None:
        code = result.exit_code
        if code == ExitCode.SUCCESS:
            if data.failed_nodes is not None:
                env.log(
                    "info",
                    f"relocation policy successful for '{sid}' on node '{data.node}', "
                    f"failed nodes: {', '.join(data.failed_nodes)}",
                )
            data.failed_nodes = None
            data.running = True
        elif code in (ExitCode.ERROR, ExitCode.EWRONG_NODE):
            data.running = False
            failed = _record_failure(manager, sid, data.node)
            if len(failed) <= config.max_relocate:
                preference = "try-next"
                env.log(
                    "warning",
                    f"starting service {sid} on node '{data.node}' failed, relocating service.",
                )
            else:
                env.log(
                    "err",
                    f"recovery policy for service {sid} failed, entering error state. "
                    f"Failed nodes: {', '.join(failed)}",
                )
                manager.change_state(sid, "error")
                return
        else:
            _record_failure(manager, sid, data.node)
            env.log("err", f"service '{sid}' got unrecoverable error (exit code {code}))")
            manager.change_state(sid, "error")
            return
    node = manager.select_service_node(sid, config, preference)
    if node is not None and node != data.node:
        fallback = data.maintenance_node
        if fallback is not None:
            if node == fallback:
                env.log(
                    "info",
                    f"moving service '{sid}' back to '{fallback}', "
                    "node came back from maintenance.",
                )
                data.maintenance_node = None
            elif data.node != fallback:
                env.log("info", f"dropping maintenance fallback node '{fallback}' for '{sid}'")
                data.maintenance_node = None
        if config.type == "vm":
            env.log("info", f"migrate service '{sid}' to node '{node}' (running)")
            manager.change_state(sid, "migrate", node=data.node, target=node)
        else:
            env.log("info", f"relocate service '{sid}' to node '{node}'")
            manager.change_state(sid, "relocate", node=data.node, target=node)
        return
    if preference == "try-next" and node is None:
        env.log(
            "warning",
            f"Start Error Recovery: Tried all available nodes for service '{sid}', retry start on "
            f"current node. Tried nodes: {', '.join(data.failed_nodes or [])}",
        )
    if (
        data.maintenance_node
        and data.node == data.maintenance_node
        and ns.get_node_state(data.node) == "online"
    ):
        env.log(
            "info",
            f"service '{sid}': clearing stale maintenance node '{data.maintenance_node}' "
            "setting (is current node)",
        )
        data.maintenance_node = None
    if result is not None:
        from rucher.ha.manager import new_uid

        data.uid = new_uid(data.state)


def next_recovery(manager: Manager, sid: str, config: ServiceConfig) -> None:
    """Place a fenced node's service on a healthy node, or keep trying."""
    data = manager.ss[sid]
    env = manager.env
    fenced = data.node
    refused: frozenset[str] = frozenset()
    node = manager.select_service_node(sid, config, "best-score")
    while node is not None:
        try:
            env.steal_service(sid, fenced, node)
        except NoRoomError as err:
            env.log("warning", f"recovery node '{node}' refused service '{sid}': {err}")
            refused |= {node}
            node = manager.select_service_node(sid, config, "best-score", refused)
            continue
        if node == fenced:
            env.log(
                "info",
                f"recover service '{sid}' to previous failed and fenced node '{fenced}' again",
            )
        else:
            env.log("info", f"recover service '{sid}' from fenced node '{fenced}' to node '{node}'")
        config.node = node
        data.node = node
        manager.change_state(
            sid, "started" if config.state == "started" else "request_stop", node=node
        )
        return
    env.log(
        "err",
        f"recovering service '{sid}' from fenced node '{fenced}' failed, no recovery node found",
    )
    if config.state == "disabled":
        data.failed_nodes = None
        manager.change_state(sid, "stopped")


def auto_rebalance(manager: Manager, services: dict[str, ServiceConfig]) -> None:
    """Automatic rebalancing (``ha-auto-rebalance``): delegated to the rebalance module."""
    if not manager.settings.auto_rebalance:
        return
    from rucher.ha.rebalance import rebalance_round

    rebalance_round(manager, services)
