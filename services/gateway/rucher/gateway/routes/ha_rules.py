"""``/cluster/ha/rules`` and ``/cluster/ha/groups``: HA placement rules, in the ``ha`` bucket.

Node-affinity rules (nodes with priorities, ``strict``) and resource-affinity rules (``positive``
keeps resources together, ``negative`` apart), Proxmox 9's ``rules.cfg``; and the older groups
(``groups.cfg``), which the manager maps onto node-affinity rules. Each is one document changed
by compare-and-set with Proxmox's ``digest`` (``rucher.haconfig``).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from rucher.bus import RucherError
from rucher.gateway.routes.ha import store_of
from rucher.gateway.routing import Call, RouteTable
from rucher.proto.errors import ErrorCode
from rucher.proto.ha import Affinity, HaGroup, HaGroups, HaRule, HaRules, RuleType
from rucher.pve.params import ParamError
from rucher.pve.values import split_list

ROUTES = RouteTable()

_NODE_PRIORITY = re.compile(r"^([a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?::(\d+))?$")


def parse_nodes(value: str, field: str = "nodes") -> dict[str, int]:
    """``node[:priority],...`` as a dict (priority 0 when absent)."""
    nodes: dict[str, int] = {}
    for item in split_list(value):
        found = _NODE_PRIORITY.match(item)
        if found is None:
            raise ParamError({field: f"value does not look like a valid ha node name '{item}'"})
        nodes[found[1]] = int(found[2] or 0)
    if not nodes:
        raise ParamError({field: "at least one node is required"})
    return nodes


def _format_nodes(nodes: dict[str, int]) -> str:
    return ",".join(f"{node}:{prio}" if prio else node for node, prio in sorted(nodes.items()))


async def _rule_resources(call: Call, value: str) -> tuple[str, ...]:
    listed = split_list(value)
    if not listed:
        raise ParamError({"resources": "at least one resource is required"})
    configured = (await store_of(call).resources()).value.resources
    for sid in listed:
        if sid not in configured:
            raise ParamError({"resources": f"resource '{sid}' is not an HA resource"})
    return tuple(dict.fromkeys(listed))


def _rule_entry(rule: HaRule, document_digest: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "rule": rule.rule,
        "type": rule.type.value,
        "resources": ",".join(rule.resources),
        "digest": document_digest,
    }
    if rule.type is RuleType.NODE_AFFINITY:
        entry["nodes"] = _format_nodes(rule.nodes)
        entry["strict"] = int(rule.strict)
    elif rule.affinity is not None:
        entry["affinity"] = rule.affinity.value
    if rule.disable:
        entry["disable"] = 1
    if rule.comment:
        entry["comment"] = rule.comment
    return entry


def _check_rule(rule: HaRule) -> HaRule:
    if rule.type is RuleType.NODE_AFFINITY and not rule.nodes:
        raise ParamError({"nodes": "node-affinity rules need 'nodes'"})
    if rule.type is RuleType.RESOURCE_AFFINITY:
        if rule.affinity is None:
            raise ParamError({"affinity": "resource-affinity rules need 'affinity'"})
        if len(rule.resources) < 2:
            raise ParamError({"resources": "resource-affinity rules need at least two resources"})
    return rule


@ROUTES("GET", "/cluster/ha/rules")
async def list_rules(call: Call) -> list[dict[str, Any]]:
    """Every rule, optionally of one type or naming one resource."""
    read = await store_of(call).rules()
    kind, resource = call.params.get("type"), call.params.get("resource")
    return [
        _rule_entry(rule, read.digest)
        for _, rule in sorted(read.value.rules.items())
        if (kind is None or rule.type.value == kind)
        and (resource is None or resource in rule.resources)
    ]


@ROUTES("GET", "/cluster/ha/rules/{rule}")
async def get_rule(call: Call) -> dict[str, Any]:
    """One rule."""
    read = await store_of(call).rules()
    rule = read.value.rules.get(call.params["rule"])
    if rule is None:
        raise RucherError(ErrorCode.NOT_FOUND, f"no such ha rule '{call.params['rule']}'")
    return _rule_entry(rule, read.digest)


@ROUTES("POST", "/cluster/ha/rules")
async def create_rule(call: Call) -> None:
    """Create a node-affinity or resource-affinity rule."""
    p = call.params
    rule = _check_rule(
        HaRule(
            rule=p["rule"],
            type=RuleType(p["type"]),
            resources=await _rule_resources(call, p["resources"]),
            nodes=parse_nodes(p["nodes"]) if p.get("nodes") else {},
            strict=bool(p.get("strict")),
            affinity=Affinity(p["affinity"]) if p.get("affinity") else None,
            disable=bool(p.get("disable")),
            comment=p.get("comment") or "",
        )
    )

    def add(document: HaRules) -> HaRules:
        if rule.rule in document.rules:
            raise RucherError(
                ErrorCode.EXISTS,
                f"HA rule '{rule.rule}' already defined",
                details={"field": "rule"},
            )
        return HaRules(rules={**document.rules, rule.rule: rule})

    await store_of(call).change_rules(add)


@ROUTES("PUT", "/cluster/ha/rules/{rule}")
async def update_rule(call: Call) -> None:
    """Change a rule (its type stays), guarded by ``digest``."""
    p = call.params
    changes: dict[str, Any] = {}
    if p.get("resources") is not None:
        changes["resources"] = await _rule_resources(call, p["resources"])
    if p.get("nodes") is not None:
        changes["nodes"] = parse_nodes(p["nodes"])
    for name in ("strict", "disable", "comment", "affinity"):
        if p.get(name) is not None:
            changes[name] = p[name]
    for name in split_list(p.get("delete") or ""):
        if name not in ("comment", "disable", "strict", "nodes"):
            raise ParamError({"delete": f"invalid option '{name}'"})
        changes[name] = {"comment": "", "nodes": {}}.get(name, False)

    def update(document: HaRules) -> HaRules:
        current = document.rules.get(p["rule"])
        if current is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"no such ha rule '{p['rule']}'")
        if p["type"] != current.type.value:
            raise ParamError({"type": f"rule '{p['rule']}' is a {current.type.value} rule"})
        rule = _check_rule(msgspec.convert(msgspec.structs.asdict(current) | changes, HaRule))
        return HaRules(rules={**document.rules, rule.rule: rule})

    await store_of(call).change_rules(update, p.get("digest"))


@ROUTES("DELETE", "/cluster/ha/rules/{rule}")
async def delete_rule(call: Call) -> None:
    """Delete a rule."""
    name = call.params["rule"]

    def remove(document: HaRules) -> HaRules:
        if name not in document.rules:
            raise RucherError(ErrorCode.NOT_FOUND, f"no such ha rule '{name}'")
        return HaRules(rules={key: rule for key, rule in document.rules.items() if key != name})

    await store_of(call).change_rules(remove)


def _group_entry(group: HaGroup, document_digest: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "group": group.group,
        "type": "group",
        "nodes": _format_nodes(group.nodes),
        "restricted": int(group.restricted),
        "nofailback": int(group.nofailback),
        "digest": document_digest,
    }
    if group.comment:
        entry["comment"] = group.comment
    return entry


@ROUTES("GET", "/cluster/ha/groups")
async def list_groups(call: Call) -> list[dict[str, Any]]:
    """Every HA group (Proxmox before 9; the manager maps them onto node-affinity rules)."""
    read = await store_of(call).groups()
    return [_group_entry(group, read.digest) for _, group in sorted(read.value.groups.items())]


@ROUTES("GET", "/cluster/ha/groups/{group}")
async def get_group(call: Call) -> dict[str, Any]:
    """One HA group."""
    read = await store_of(call).groups()
    group = read.value.groups.get(call.params["group"])
    if group is None:
        raise RucherError(ErrorCode.NOT_FOUND, f"no such ha group '{call.params['group']}'")
    return _group_entry(group, read.digest)


@ROUTES("POST", "/cluster/ha/groups")
async def create_group(call: Call) -> None:
    """Create an HA group."""
    p = call.params
    group = HaGroup(
        group=p["group"],
        nodes=parse_nodes(p["nodes"]),
        restricted=bool(p.get("restricted")),
        nofailback=bool(p.get("nofailback")),
        comment=p.get("comment") or "",
    )

    def add(document: HaGroups) -> HaGroups:
        if group.group in document.groups:
            raise RucherError(
                ErrorCode.EXISTS,
                f"ha group '{group.group}' already defined",
                details={"field": "group"},
            )
        return HaGroups(groups={**document.groups, group.group: group})

    await store_of(call).change_groups(add)


@ROUTES("PUT", "/cluster/ha/groups/{group}")
async def update_group(call: Call) -> None:
    """Change an HA group, guarded by ``digest``."""
    p = call.params
    changes: dict[str, Any] = {}
    if p.get("nodes") is not None:
        changes["nodes"] = parse_nodes(p["nodes"])
    for name in ("restricted", "nofailback", "comment"):
        if p.get(name) is not None:
            changes[name] = p[name]
    for name in split_list(p.get("delete") or ""):
        if name not in ("comment", "restricted", "nofailback"):
            raise ParamError({"delete": f"invalid option '{name}'"})
        changes[name] = "" if name == "comment" else False

    def update(document: HaGroups) -> HaGroups:
        current = document.groups.get(p["group"])
        if current is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"no such ha group '{p['group']}'")
        group = msgspec.convert(msgspec.structs.asdict(current) | changes, HaGroup)
        return HaGroups(groups={**document.groups, group.group: group})

    await store_of(call).change_groups(update, p.get("digest"))


@ROUTES("DELETE", "/cluster/ha/groups/{group}")
async def delete_group(call: Call) -> None:
    """Delete an HA group no resource uses."""
    name = call.params["group"]
    users = [
        sid
        for sid, resource in (await store_of(call).resources()).value.resources.items()
        if resource.group == name
    ]
    if users:
        raise RucherError(
            ErrorCode.INVALID, f"ha group '{name}' is used by {', '.join(sorted(users))}"
        )

    def remove(document: HaGroups) -> HaGroups:
        if name not in document.groups:
            raise RucherError(ErrorCode.NOT_FOUND, f"no such ha group '{name}'")
        return HaGroups(groups={key: g for key, g in document.groups.items() if key != name})

    await store_of(call).change_groups(remove)
