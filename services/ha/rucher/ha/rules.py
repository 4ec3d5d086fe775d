"""Placement rules: node affinity, resource affinity, and the older groups mapped onto them.

``compile_rules`` turns the configured rules (and groups) into per-service lookups; the helpers
answer which nodes a service may and should use and which nodes its affine resources pull it to
or push it from, the way Proxmox's ``PVE::HA::Rules`` modules do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rucher.ha.model import (
    NodeAffinityRule,
    ResourceAffinityRule,
    RulesConfig,
    ServiceConfig,
    ServiceData,
)

INACTIVE_STATES = frozenset({"stopped", "request_stop", "request_start"})


@dataclass
class CompiledRules:
    """Per-service lookups: its node-affinity rule and its affine resources."""

    node_affinity: dict[str, NodeAffinityRule] = field(default_factory=dict)
    positive: dict[str, set[str]] = field(default_factory=dict)
    negative: dict[str, set[str]] = field(default_factory=dict)


def groups_to_rules(config: RulesConfig, services: Mapping[str, ServiceConfig]) -> RulesConfig:
    """Add one node-affinity rule per used group, as Proxmox's migration to rules does."""
    members: dict[str, list[str]] = {}
    for sid in sorted(services):
        group = services[sid].group
        if group is not None and group in config.groups:
            members.setdefault(group, []).append(sid)
    rules = list(config.node_affinity)
    for name in sorted(members):
        definition = config.groups[name]
        rules.append(
            NodeAffinityRule(
                name=f"ha-group-{name}",
                resources=tuple(members[name]),
                nodes=dict(definition.nodes),
                strict=definition.restricted,
            )
        )
    return RulesConfig(
        node_affinity=tuple(rules),
        resource_affinity=config.resource_affinity,
        groups=config.groups,
    )


def apply_group_failback(config: RulesConfig, services: Mapping[str, ServiceConfig]) -> None:
    """A group's ``nofailback`` becomes its resources' ``failback = false``."""
    for service in services.values():
        group = config.groups.get(service.group or "")
        if group is not None and group.nofailback:
            service.failback = False


def _merge_positive(rules: Iterable[ResourceAffinityRule]) -> list[set[str]]:
    sets: list[set[str]] = []
    for rule in rules:
        merged = set(rule.resources)
        rest = []
        for existing in sets:
            if existing & merged:
                merged |= existing
            else:
                rest.append(existing)
        sets = [*rest, merged]
    return sets


def compile_rules(config: RulesConfig, nodes: Iterable[str]) -> CompiledRules:
    """Per-service lookups from the rules, ignoring nodes that are not cluster members."""
    known = set(nodes)
    compiled = CompiledRules()
    seen: dict[str, int] = {}
    for rule in config.node_affinity:
        for sid in rule.resources:
            seen[sid] = seen.get(sid, 0) + 1
    for rule in config.node_affinity:
        usable = {node: prio for node, prio in rule.nodes.items() if node in known}
        for sid in rule.resources:
            if seen[sid] == 1 and usable:
                compiled.node_affinity[sid] = NodeAffinityRule(
                    name=rule.name, resources=rule.resources, nodes=usable, strict=rule.strict
                )
    positive = [rule for rule in config.resource_affinity if rule.affinity == "positive"]
    for together in _merge_positive(positive):
        for sid in together:
            compiled.positive[sid] = together - {sid}
        inherited = {
            compiled.node_affinity[sid].name: compiled.node_affinity[sid]
            for sid in together
            if sid in compiled.node_affinity
        }
        if len(inherited) == 1:
            (rule,) = inherited.values()
            for sid in together:
                compiled.node_affinity.setdefault(sid, rule)
    for affinity in config.resource_affinity:
        if affinity.affinity == "negative":
            _add_negative(compiled, affinity.resources)
    return compiled


def _add_negative(compiled: CompiledRules, resources: tuple[str, ...]) -> None:
    """Keep each resource, and its positive partners, apart from the others and theirs."""
    for sid in resources:
        group = {sid} | compiled.positive.get(sid, set())
        for other in resources:
            if other == sid:
                continue
            apart = {other} | compiled.positive.get(other, set())
            for member in group:
                compiled.negative.setdefault(member, set()).update(apart)


def get_node_affinity(
    rules: CompiledRules, sid: str, online: set[str]
) -> tuple[set[str], set[str]]:
    """The nodes the service may use, and among them those of the highest priority."""
    rule = rules.node_affinity.get(sid)
    if rule is None:
        return set(online), set(online)
    allowed: set[str] = set()
    by_priority: dict[int, set[str]] = {}
    for node, priority in rule.nodes.items():
        if node in online:
            allowed.add(node)
            by_priority.setdefault(priority, set()).add(node)
    if not rule.strict:
        for node in online - allowed:
            allowed.add(node)
            by_priority.setdefault(-1, set()).add(node)
    if not by_priority:
        return allowed, set()
    return allowed, by_priority[max(by_priority)]


def _occupied(data: ServiceData) -> tuple[str, ...]:
    """The nodes a partner counts on: both ends of a move, only the target of a balanced start."""
    if data.state == "request_start_balance" and data.target is not None:
        return (data.target,)
    if data.target is not None:
        return (data.node, data.target)
    return (data.node,)


def get_resource_affinity(
    rules: CompiledRules, sid: str, status: Mapping[str, ServiceData], online: set[str]
) -> tuple[dict[str, int], set[str]]:
    """Nodes the service's positive partners use (with counts) and its negative partners use."""
    together: dict[str, int] = {}
    separate: set[str] = set()
    for other in sorted(rules.positive.get(sid, ())):
        data = status.get(other)
        if data is None or data.state in INACTIVE_STATES:
            continue
        for node in _occupied(data):
            if node in online:
                together[node] = together.get(node, 0) + 1
    for other in sorted(rules.negative.get(sid, ())):
        data = status.get(other)
        if data is None or data.state in INACTIVE_STATES:
            continue
        for node in _occupied(data):
            if node in online:
                separate.add(node)
    return together, separate


def is_allowed_on_node(together: dict[str, int], separate: set[str], node: str) -> bool:
    """Whether the resource-affinity rules let the service stay on ``node``."""
    if node in separate:
        return False
    return not together or node in together


def apply_negative(separate: set[str], nodes: set[str]) -> None:
    """Drop the nodes a negative partner uses."""
    nodes -= separate


def apply_positive(together: dict[str, int], nodes: set[str]) -> None:
    """Keep only the usable nodes most positive partners use (if any partner uses one)."""
    counts = {node: together[node] for node in nodes if together.get(node, 0) > 0}
    if not counts:
        return
    most = max(counts.values())
    nodes.intersection_update({node for node, count in counts.items() if count == most})


def affine_resources(rules: CompiledRules, sid: str) -> tuple[set[str], set[str]]:
    """The resources kept together with and apart from ``sid``."""
    return set(rules.positive.get(sid, ())), set(rules.negative.get(sid, ()))
