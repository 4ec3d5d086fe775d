"""The simulator's command language and its round loop."""

from __future__ import annotations

from rucher.ha.crm import Crm
from rucher.ha.lrm import Lrm
from rucher.ha.model import parse_sid
from rucher.ha.sim.env import SimEnv
from rucher.ha.sim.hardware import MAX_SIM_TIME, Hardware
from rucher.ha.sim.scenario import ScenarioError, service_config

MIB = 1024 * 1024


def _node_command(hw: Hardware, verb: str, node_name: str, args: list[str], source: str) -> None:  # noqa: PLR0912, PLR0915
    node = hw.nodes.get(node_name)
    if node is None:
        raise ScenarioError(f"cmdlist: no such node '{node_name}'")
    action = args[0] if args else ""
    if verb == "power":
        if action not in ("on", "off"):
            raise ScenarioError(f"cmdlist: unknown power action '{action}'")
        if node.power != (action == "on"):
            if action == "on":
                node.power = True
                hw.power_on(node)
            else:
                hw.power_off(node)
        node.power = node.network = action == "on"
        node.shutdown = None
    elif verb == "network":
        if action not in ("on", "off"):
            raise ScenarioError(f"cmdlist: unknown network action '{action}'")
        node.network = action == "on"
    elif verb == "cfs":
        if action not in ("rw", "update") or len(args) < 2 or args[1] not in ("work", "fail"):
            raise ScenarioError(f"cmdlist: bad cfs command for node '{node_name}'")
        node.cfs[action] = args[1] == "work"
    elif verb in ("reboot", "shutdown"):
        node.shutdown = verb
        if node.lrm is not None:
            node.lrm.shutdown_request()
    elif verb == "restart-lrm":
        if node.lrm is not None:
            node.lrm_restart = True
            node.lrm.shutdown_request()
    elif verb == "crm":
        if action == "stop":
            if node.crm is not None:
                node.crm_stop = True
                node.crm.shutdown_request()
        elif action == "start":
            if node.crm is None:
                node.crm = Crm(SimEnv(hw, node.name, "crm"))
        elif action in ("enable-node-maintenance", "disable-node-maintenance"):
            hw.crm_commands.append(f"{action} {node_name}")
        elif action == "disarm-ha":
            hw.crm_commands.append(f"disarm-ha {args[1] if len(args) > 1 else 'freeze'}")
        elif action == "arm-ha":
            hw.crm_commands.append("arm-ha")
        else:
            raise ScenarioError(f"cmdlist: unknown crm action '{action}'")
    elif verb == "pve-manager-version":
        node.version = args[-1] if args else ""
    else:
        raise ScenarioError(f"cmdlist: unknown command '{verb}'")


def _service_command(hw: Hardware, sid: str, args: list[str]) -> None:  # noqa: PLR0912
    try:
        parse_sid(sid)
    except ValueError as error:
        raise ScenarioError(f"cmdlist: {error}") from error
    action = args[0] if args else ""
    config = hw.services.get(sid)
    if action in ("started", "disabled", "stopped", "ignored"):
        if config is None:
            raise ScenarioError(f"cmdlist: no such service '{sid}'")
        config.state = action
    elif action in ("migrate", "relocate"):
        if len(args) < 2:
            raise ScenarioError(f"cmdlist: missing target node for '{action}'")
        hw.crm_commands.append(f"{action} {sid} {args[1]}")
    elif action == "stop":
        hw.crm_commands.append(f"stop {sid} {args[1] if len(args) > 1 else 0}")
    elif action == "add":
        if sid in hw.services:
            raise ScenarioError(f"cmdlist: resource ID '{sid}' already defined")
        if len(args) < 2 or args[1] not in hw.nodes:
            raise ScenarioError(f"cmdlist: 'service {sid} add' needs an existing node")
        state = args[2] if len(args) > 2 else "started"
        hw.services[sid] = service_config(sid, {"node": args[1], "state": state})
        if len(args) > 3 and args[3] == "1":
            hw.nodes[args[1]].running.add(sid)
    elif action == "delete":
        hw.services.pop(sid, None)
    elif action in ("lock", "unlock"):
        pass  # locks only matter to real guests' configuration, not to the HA state machine
    elif action == "manual-migrate":
        if config is None:
            raise ScenarioError(f"cmdlist: no such service '{sid}'")
        source = config.node
        config.node = args[1]
        if sid in hw.nodes[source].running:
            hw.nodes[source].running.discard(sid)
            hw.nodes[args[1]].running.add(sid)
    elif action in ("set-static-stats", "set-dynamic-stats"):
        table = hw.static_stats if action == "set-static-stats" else hw.dynamic_stats
        entry = table.setdefault(sid, {})
        pairs = args[1:]
        for key, value in zip(pairs[::2], pairs[1::2], strict=False):
            entry[key] = float(value) * (MIB if key in ("mem", "maxmem") else 1)
    else:
        raise ScenarioError(f"cmdlist: unknown service action '{action}'")


def execute(hw: Hardware, command: str, source: str = "cmdlist") -> None:
    """Apply one simulator command."""
    words = command.split()
    if len(words) < 2:
        raise ScenarioError(f"cmdlist: incomplete command '{command}'")
    hw.log("info", f"execute {command}", source)
    verb, obj, args = words[0], words[1], words[2:]
    if verb == "service":
        _service_command(hw, obj, args)
    elif verb == "skip-round":
        hw.skip[obj] = hw.skip.get(obj, 0) + (int(args[0]) if args else 1)
    else:
        _node_command(hw, verb, obj, args, source)


def _step_node(hw: Hardware, name: str, skip_crm: bool, skip_lrm: bool) -> None:
    node = hw.nodes[name]
    update_ok = node.cfs.get("update", True)
    if node.crm is not None and not skip_crm:
        alive = node.crm.iterate(update_ok)
        hw.time += 1
        if not alive:
            node.crm.env.log("info", "exit (loop end)")
            node.crm = None
            if node.shutdown == "reboot":
                execute(hw, f"power {name} off", "reboot")
                execute(hw, f"power {name} on", "reboot")
            elif node.shutdown == "shutdown":
                execute(hw, f"power {name} off", "shutdown")
            node.crm_stop = False
    if node.lrm is not None and not skip_lrm:
        alive = node.lrm.iterate(update_ok)
        hw.time += 1
        if not alive:
            node.lrm.env.log("info", "exit (loop end)")
            node.lrm = None
            if node.lrm_restart:
                node.lrm_restart = False
                node.lrm = Lrm(SimEnv(hw, name, "lrm"))
            elif node.shutdown in ("reboot", "shutdown"):
                execute(hw, f"crm {name} stop", node.shutdown)
    for other in sorted(hw.nodes):
        if hw.watchdog_expired(other):
            execute(hw, f"power {other} off", "watchdog")
            hw.log("info", f"server '{other}' stopped by poweroff (watchdog)")


def run(hw: Hardware) -> list[str]:  # noqa: PLR0912
    """Run the scenario to its end; the log lines."""
    hw.log("info", "starting simulation")
    for node in hw.nodes.values():
        if node.power:
            hw.power_on(node)
    loop_count = 0
    last_command_time = 0
    next_command_at = 0
    round_length = max(20, 2 * len(hw.nodes))
    while True:
        start = hw.time
        skip_crm = hw.skip.get("crm", 0) > 0
        skip_lrm = hw.skip.get("lrm", 0) > 0
        for name in sorted(hw.nodes):
            _step_node(hw, name, skip_crm, skip_lrm)
        for kind, skipped in (("crm", skip_crm), ("lrm", skip_lrm)):
            if skipped:
                hw.skip[kind] -= 1
        hw.time = max(hw.time, start + round_length)
        if hw.time > MAX_SIM_TIME:
            raise ScenarioError("simulation ran past its time limit")
        if hw.time < next_command_at:
            continue
        if loop_count % 5 == 0:
            if not hw.commands:
                if hw.time - last_command_time > 500:
                    hw.log("info", "exit simulation - done")
                    return hw.lines
            else:
                for command in hw.commands.pop(0):
                    last_command_time = hw.time
                    words = command.split()
                    if words and words[0] == "delay":
                        next_command_at = hw.time + int(words[1])
                    else:
                        execute(hw, command)
        loop_count += 1
