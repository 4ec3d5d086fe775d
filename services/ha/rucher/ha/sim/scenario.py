"""Reading a Proxmox HA scenario folder (never its ``log.expect``).

``hardware_status``, ``service_config``, ``manager_status``, ``cmdlist`` and the optional
``groups``, ``rules_config``, ``datacenter.cfg``, ``static_service_stats`` and
``dynamic_service_stats``, in the formats Proxmox's test suite uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rucher.ha.model import (
    ClusterSettings,
    DisarmState,
    Group,
    ManagerState,
    NodeAffinityRule,
    ResourceAffinityRule,
    RulesConfig,
    ServiceConfig,
    ServiceData,
    parse_sid,
)


class ScenarioError(ValueError):
    """A scenario file that cannot be read, naming the file and the problem."""


@dataclass
class Scenario:
    """Everything a scenario folder configures."""

    hardware: dict[str, dict[str, Any]]
    services: dict[str, ServiceConfig]
    manager_status: ManagerState
    commands: list[list[str]]
    rules: RulesConfig = field(default_factory=RulesConfig)
    settings: ClusterSettings = field(default_factory=ClusterSettings)
    static_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    dynamic_stats: dict[str, dict[str, float]] = field(default_factory=dict)


def _json(path: Path, default: Any = None) -> Any:
    if not path.exists():
        if default is None:
            raise ScenarioError(f"{path.name}: missing")
        return default
    text = path.read_text().strip()
    if not text:
        return default if default is not None else {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ScenarioError(f"{path.name}: invalid JSON ({error})") from error


def _flag(value: Any) -> bool:
    return str(value).strip() not in ("", "0", "false", "False")


def service_config(sid: str, raw: dict[str, Any]) -> ServiceConfig:
    """One resource's configuration, Proxmox's simulator defaults filled in."""
    try:
        parse_sid(sid)
    except ValueError as error:
        raise ScenarioError(f"service_config: {error}") from error
    if not raw.get("node"):
        raise ScenarioError(f"service_config: service '{sid}' without assigned node")
    state = raw.get("state") or "disabled"
    if state == "enabled":
        state = "started"
    return ServiceConfig(
        sid=sid,
        node=str(raw["node"]),
        state=str(state),
        max_restart=int(raw.get("max_restart", 1)),
        max_relocate=int(raw.get("max_relocate", 1)),
        failback=_flag(raw.get("failback", 1)),
        group=raw.get("group"),
    )


def _sections(text: str) -> list[tuple[str, str, dict[str, str]]]:
    sections: list[tuple[str, str, dict[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            kind, _, name = line.partition(":")
            sections.append((kind.strip(), name.strip(), {}))
        elif sections:
            key, _, value = line.strip().partition(" ")
            sections[-1][2][key] = value.strip()
    return sections


def _nodes(spec: str) -> dict[str, int]:
    nodes: dict[str, int] = {}
    for entry in spec.replace(" ", ",").split(","):
        if not entry:
            continue
        name, _, priority = entry.partition(":")
        nodes[name] = int(priority) if priority else 0
    return nodes


def rules_config(rules_text: str, groups_text: str) -> RulesConfig:
    """Node- and resource-affinity rules and groups from their section-config texts."""
    node_affinity = []
    resource_affinity = []
    for kind, name, props in _sections(rules_text):
        if _flag(props.get("disable", 0)):
            continue
        resources = tuple(r for r in props.get("resources", "").split(",") if r)
        if kind == "node-affinity":
            node_affinity.append(
                NodeAffinityRule(
                    name=name,
                    resources=resources,
                    nodes=_nodes(props.get("nodes", "")),
                    strict=_flag(props.get("strict", 0)),
                )
            )
        elif kind == "resource-affinity":
            resource_affinity.append(
                ResourceAffinityRule(name=name, resources=resources, affinity=props["affinity"])
            )
        else:
            raise ScenarioError(f"rules_config: unknown rule type '{kind}'")
    groups = {
        name: Group(
            name=name,
            nodes=_nodes(props.get("nodes", "")),
            restricted=_flag(props.get("restricted", 0)),
            nofailback=_flag(props.get("nofailback", 0)),
        )
        for kind, name, props in _sections(groups_text)
        if kind == "group"
    }
    return RulesConfig(
        node_affinity=tuple(node_affinity),
        resource_affinity=tuple(resource_affinity),
        groups=groups,
    )


def settings(raw: dict[str, Any]) -> ClusterSettings:
    """The datacenter settings that matter to HA."""
    crs = raw.get("crs", {})
    ha = raw.get("ha", {})
    return ClusterSettings(
        shutdown_policy=str(ha.get("shutdown_policy", "conditional")),
        crs_mode=str(crs.get("ha", "basic")),
        rebalance_on_start=_flag(crs.get("ha-rebalance-on-start", 0)),
        auto_rebalance=_flag(crs.get("ha-auto-rebalance", 0)),
        auto_rebalance_method=str(crs.get("ha-auto-rebalance-method", "bruteforce")),
        auto_rebalance_threshold=float(crs.get("ha-auto-rebalance-threshold", 0.3)),
        auto_rebalance_margin=float(crs.get("ha-auto-rebalance-margin", 0.1)),
        auto_rebalance_hold=int(crs.get("ha-auto-rebalance-hold-duration", 3)),
    )


def manager_status(raw: dict[str, Any]) -> ManagerState:
    """A published manager status."""
    services = {
        sid: ServiceData(
            state=str(d["state"]),
            node=str(d["node"]),
            uid=str(d.get("uid", "")),
            target=d.get("target"),
            failed_nodes=d.get("failed_nodes"),
            maintenance_node=d.get("maintenance_node"),
        )
        for sid, d in raw.get("service_status", {}).items()
    }
    disarm = raw.get("disarm")
    return ManagerState(
        master_node=str(raw.get("master_node", "")),
        node_status=dict(raw.get("node_status", {})),
        service_status=services,
        node_request=dict(raw.get("node_request", {})),
        disarm=DisarmState(mode=str(disarm["mode"])) if isinstance(disarm, dict) else None,
    )


def load(folder: Path) -> Scenario:
    """Read a scenario folder; a clear error naming the file when one is malformed."""
    if not folder.is_dir():
        raise ScenarioError(f"{folder}: not a scenario folder")
    hardware = _json(folder / "hardware_status")
    raw_services = _json(folder / "service_config", {})
    commands = _json(folder / "cmdlist")
    if not isinstance(commands, list) or not all(isinstance(slot, list) for slot in commands):
        raise ScenarioError("cmdlist: expected a JSON list of command lists")
    groups = folder / "groups"
    rules = folder / "rules_config"
    return Scenario(
        hardware=hardware,
        services={sid: service_config(sid, raw) for sid, raw in raw_services.items()},
        manager_status=manager_status(_json(folder / "manager_status", {})),
        commands=[[str(command) for command in slot] for slot in commands],
        rules=rules_config(
            rules.read_text() if rules.exists() else "",
            groups.read_text() if groups.exists() else "",
        ),
        settings=settings(_json(folder / "datacenter.cfg", {})),
        static_stats=_json(folder / "static_service_stats", {}),
        dynamic_stats=_json(folder / "dynamic_service_stats", {}),
    )
