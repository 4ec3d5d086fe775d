"""Conversions between the decision core's values and the documents in the cluster store.

Pure functions: the manager's whole state and the LRM status to and from their ``ha`` bucket
documents, the Proxmox-visible ``manager_status``, the resources' configuration joined with the
guest registry's owner nodes, the rules and groups, and the administrator's ``control`` wishes
turned into the manager commands the core understands.
"""

from __future__ import annotations

from collections.abc import Mapping

from rucher.ha.model import (
    DisarmState,
    Group,
    LrmResult,
    LrmStatus,
    ManagerState,
    NodeAffinityRule,
    ResourceAffinityRule,
    RulesConfig,
    ServiceConfig,
    ServiceData,
)
from rucher.proto.guest import GuestRecord
from rucher.proto.ha import (
    ArmedState,
    DisarmMode,
    HaControl,
    HaDisarmRecord,
    HaGroups,
    HaLrmResult,
    HaLrmStatus,
    HaManagerState,
    HaResources,
    HaRules,
    HaServiceRecord,
    ManagerStatus,
    NodeState,
    RuleType,
    ServiceState,
    ServiceStatus,
)

MIB = 1024 * 1024
# The proto's service states are Proxmox's public ones; the core's internal extra maps onto one.
PUBLIC_STATE = {"request_start_balance": ServiceState.REQUEST_START}


def vmid_of(sid: str) -> int | None:
    """The VMID of a ``vm:`` resource (containers are not compute guests yet)."""
    kind, _, number = sid.partition(":")
    return int(number) if kind == "vm" and number.isdigit() else None


def state_to_record(state: ManagerState, token: int, epochs: Mapping[str, int]) -> HaManagerState:
    """The manager's whole state as its ``manager_state`` document."""
    services = {
        sid: HaServiceRecord(
            state=data.state,
            node=data.node,
            uid=data.uid,
            target=data.target,
            timeout=data.timeout,
            failed_nodes=tuple(data.failed_nodes) if data.failed_nodes is not None else None,
            maintenance_node=data.maintenance_node,
            cmd=tuple(data.cmd) if data.cmd is not None else None,
            running=data.running,
        )
        for sid, data in state.service_status.items()
    }
    disarm = state.disarm
    return HaManagerState(
        master_node=state.master_node,
        manager_token=token,
        timestamp=state.timestamp,
        node_status=dict(state.node_status),
        service_status=services,
        node_request={node: dict(flags) for node, flags in state.node_request.items()},
        disarm=HaDisarmRecord(
            mode=disarm.mode, applied=disarm.applied, disarmed=disarm.disarmed, rearm=disarm.rearm
        )
        if disarm is not None
        else None,
        node_epochs=dict(epochs),
    )


def record_to_state(record: HaManagerState | None) -> ManagerState:
    """The core's manager state from its document (an empty state before any manager ran)."""
    if record is None:
        return ManagerState()
    services = {
        sid: ServiceData(
            state=data.state,
            node=data.node,
            uid=data.uid,
            target=data.target,
            timeout=data.timeout,
            failed_nodes=list(data.failed_nodes) if data.failed_nodes is not None else None,
            maintenance_node=data.maintenance_node,
            cmd=list(data.cmd) if data.cmd is not None else None,
            running=data.running,
        )
        for sid, data in record.service_status.items()
    }
    disarm = record.disarm
    return ManagerState(
        master_node=record.master_node,
        timestamp=record.timestamp,
        node_status=dict(record.node_status),
        service_status=services,
        node_request={node: dict(flags) for node, flags in record.node_request.items()},
        disarm=DisarmState(
            mode=disarm.mode, applied=disarm.applied, disarmed=disarm.disarmed, rearm=disarm.rearm
        )
        if disarm is not None
        else None,
    )


def public_status(record: HaManagerState) -> ManagerStatus:
    """The Proxmox-visible ``manager_status`` the gateway shows."""
    services = {
        sid: ServiceStatus(
            state=PUBLIC_STATE.get(data.state, ServiceState(data.state)),
            node=data.node,
            target=data.target,
            uid=data.uid,
            failed_nodes=data.failed_nodes or (),
        )
        for sid, data in record.service_status.items()
    }
    disarm = record.disarm
    if disarm is None:
        armed = ArmedState.ARMED
    elif disarm.rearm:
        armed = ArmedState.STANDBY
    else:
        armed = ArmedState.DISARMED if disarm.disarmed else ArmedState.DISARMING
    return ManagerStatus(
        master_node=record.master_node,
        manager_token=record.manager_token,
        timestamp=record.timestamp,
        node_status={node: NodeState(state) for node, state in record.node_status.items()},
        service_status=services,
        armed_state=armed,
        disarm_mode=DisarmMode(disarm.mode) if disarm is not None else None,
    )


def lrm_to_record(node: str, status: LrmStatus) -> HaLrmStatus:
    """An LRM status as its ``lrm.{node}`` document."""
    return HaLrmStatus(
        node=node,
        state=status.state,
        mode=status.mode,
        results={
            uid: HaLrmResult(sid=r.sid, state=r.state, exit_code=r.exit_code)
            for uid, r in status.results.items()
        },
        timestamp=status.timestamp,
    )


def record_to_lrm(record: HaLrmStatus | None) -> LrmStatus:
    """The core's LRM status from its document (an empty status when the node never wrote)."""
    if record is None:
        return LrmStatus()
    return LrmStatus(
        state=record.state,
        mode=record.mode,
        results={
            uid: LrmResult(sid=r.sid, state=r.state, exit_code=r.exit_code)
            for uid, r in record.results.items()
        },
        timestamp=record.timestamp,
    )


def service_configs(
    resources: HaResources, guests: Mapping[int, GuestRecord]
) -> dict[str, ServiceConfig]:
    """Each HA resource's configuration, on the node the guest registry says owns it.

    A ``vm:`` resource whose guest does not exist has no node and is left out (the manager
    drops it as having no configuration, as Proxmox does without a guest config file).
    """
    configs: dict[str, ServiceConfig] = {}
    for sid, resource in resources.resources.items():
        vmid = vmid_of(sid)
        record = guests.get(vmid) if vmid is not None else None
        if record is None:
            continue
        configs[sid] = ServiceConfig(
            sid=sid,
            node=record.node,
            state=resource.state.value,
            max_restart=resource.max_restart,
            max_relocate=resource.max_relocate,
            failback=resource.failback,
            group=resource.group,
        )
    return configs


def rules_config(rules: HaRules, groups: HaGroups) -> RulesConfig:
    """The enabled rules and every group, as the core reads them."""
    node_affinity = []
    resource_affinity = []
    for name in sorted(rules.rules):
        rule = rules.rules[name]
        if rule.disable:
            continue
        if rule.type is RuleType.NODE_AFFINITY:
            node_affinity.append(
                NodeAffinityRule(
                    name=name, resources=rule.resources, nodes=dict(rule.nodes), strict=rule.strict
                )
            )
        elif rule.affinity is not None:
            resource_affinity.append(
                ResourceAffinityRule(
                    name=name, resources=rule.resources, affinity=rule.affinity.value
                )
            )
    return RulesConfig(
        node_affinity=tuple(node_affinity),
        resource_affinity=tuple(resource_affinity),
        groups={
            name: Group(
                name=name,
                nodes=dict(group.nodes),
                restricted=group.restricted,
                nofailback=group.nofailback,
            )
            for name, group in groups.groups.items()
        },
    )


def control_commands(control: HaControl, state: ManagerState) -> list[str]:
    """The manager commands that bring the manager's state to what ``control`` asks for."""
    commands: list[str] = []
    pending = state.disarm
    if not control.armed and (pending is None or pending.rearm):
        mode = control.disarm_mode.value if control.disarm_mode else "freeze"
        commands.append(f"disarm-ha {mode}")
    elif control.armed and pending is not None and not pending.rearm:
        commands.append("arm-ha")
    requested = {n for n, flags in state.node_request.items() if flags.get("maintenance")}
    wanted = set(control.maintenance)
    commands += [f"enable-node-maintenance {node}" for node in sorted(wanted - requested)]
    commands += [f"disable-node-maintenance {node}" for node in sorted(requested - wanted)]
    return commands


def guest_stats(record: GuestRecord | None) -> tuple[float, float]:
    """A guest's configured CPUs and memory in bytes (Proxmox's defaults: 1 core, 512 MiB)."""
    if record is None:
        return 0.0, 0.0
    config = record.config

    def number(key: str, default: float) -> float:
        try:
            return float(config.get(key, default))
        except ValueError:
            return default

    cpus = number("vcpus", 0.0) or number("cores", 1.0) * number("sockets", 1.0)
    return cpus, number("memory", 512.0) * MIB
