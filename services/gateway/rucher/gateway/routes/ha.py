"""``/cluster/ha``: HA resources, rules, groups and status, kept in the cluster store (``ha``).

The gateway writes the configuration documents itself, by compare-and-set with Proxmox's
``digest`` (``rucher.haconfig``); the elected HA manager reads them every round and publishes
its status, which ``/cluster/ha/status/*`` shows. Migrate and relocate queue a request for the
manager, as ``ha-manager`` does. Rucher's extension ``POST /nodes/{node}/ha/maintenance`` puts a
node in maintenance or takes it out (Proxmox 9: ``ha-manager crm-command node-maintenance``).
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.gateway.routing import Call, RouteTable
from rucher.guests import GuestRegistry
from rucher.haconfig import HaConfigStore
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType
from rucher.proto.ha import (
    CrmAction,
    CrmRequest,
    DisarmMode,
    HaControl,
    HaResource,
    HaResources,
    HaRule,
    HaRules,
    RequestedState,
)
from rucher.pve.params import ParamError
from rucher.pve.schema import ApiSchema, Endpoint, Param, ParamsSpec, Permissions
from rucher.pve.values import split_list

ROUTES = RouteTable()

_SID = re.compile(r"^(?:(vm|ct):)?(\d+)$")
TYPES = {GuestType.QEMU: "vm", GuestType.LXC: "ct"}
RESOURCE_FIELDS = ("state", "max_restart", "max_relocate", "failback", "comment", "group")
RESOURCE_DEFAULTS = HaResource(sid="vm:100")
MAINTENANCE_PATH = "/nodes/{node}/ha/maintenance"


def store_of(call: Call) -> HaConfigStore:
    """The HA configuration store the gateway writes."""
    return HaConfigStore(call.gateway.bus)


# Resources -------------------------------------------------------------------------------------


async def parse_sid(call: Call, value: str, kind: str | None = None) -> str:
    """``vm:ID``/``ct:ID``/``ID`` as a sid of an existing guest of that type (400 on ``sid``)."""
    found = _SID.match(value)
    if found is None:
        raise ParamError({"sid": "value does not look like a valid ha resource id"})
    prefix, vmid = found[1], int(found[2])
    if kind is not None and prefix is not None and kind != prefix:
        raise ParamError({"type": f"types does not match ({kind} != {prefix})"})
    registry: GuestRegistry = call.gateway.guests
    try:
        record = await registry.get(vmid)
    except RucherError as err:
        if err.code is not ErrorCode.NOT_FOUND:
            raise
        name = f"{prefix or kind or 'vm'}:{vmid}"
        raise ParamError({"sid": f"resource '{name}' does not exist in cluster"}) from err
    actual = TYPES[record.type]
    if (prefix or kind or actual) != actual:
        raise ParamError({"sid": f"resource '{prefix or kind}:{vmid}' does not exist in cluster"})
    return f"{actual}:{vmid}"


def _sid_of_existing(resources: HaResources, value: str) -> str:
    """The configured sid ``value`` names (a bare VMID matches vm: or ct:), or 404."""
    found = _SID.match(value)
    if found is None:
        raise ParamError({"sid": "value does not look like a valid ha resource id"})
    candidates = [f"{found[1]}:{found[2]}"] if found[1] else [f"vm:{found[2]}", f"ct:{found[2]}"]
    for sid in candidates:
        if sid in resources.resources:
            return sid
    raise RucherError(ErrorCode.NOT_FOUND, f"no such resource '{value}'")


def _requested_state(value: str | None) -> RequestedState | None:
    if value is None:
        return None
    # Proxmox still accepts the old name ``enabled`` for ``started``.
    return RequestedState.STARTED if value == "enabled" else RequestedState(value)


def _resource_entry(resource: HaResource, document_digest: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "sid": resource.sid,
        "type": resource.sid.split(":")[0],
        "state": resource.state.value,
        "max_restart": resource.max_restart,
        "max_relocate": resource.max_relocate,
        "failback": int(resource.failback),
        "digest": document_digest,
    }
    if resource.comment:
        entry["comment"] = resource.comment
    if resource.group:
        entry["group"] = resource.group
    return entry


async def _check_group(call: Call, group: str | None) -> None:
    if group is not None and group not in (await store_of(call).groups()).value.groups:
        raise ParamError({"group": f"group '{group}' does not exist"})


@ROUTES("GET", "/cluster/ha")
async def ha_index(call: Call) -> list[dict[str, str]]:
    """The HA directory."""
    return [{"id": name} for name in ("status", "resources", "groups", "rules")]


@ROUTES("GET", "/cluster/ha/resources")
async def list_resources(call: Call) -> list[dict[str, Any]]:
    """Every HA resource, optionally of one type."""
    read = await store_of(call).resources()
    kind = call.params.get("type")
    return [
        _resource_entry(resource, read.digest)
        for sid, resource in sorted(read.value.resources.items())
        if kind is None or sid.startswith(f"{kind}:")
    ]


@ROUTES("GET", "/cluster/ha/resources/{sid}")
async def get_resource(call: Call) -> dict[str, Any]:
    """One HA resource's configuration and the document's digest."""
    read = await store_of(call).resources()
    sid = _sid_of_existing(read.value, call.params["sid"])
    return _resource_entry(read.value.resources[sid], read.digest)


@ROUTES("POST", "/cluster/ha/resources")
async def create_resource(call: Call) -> None:
    """Put a guest under HA (it must exist; the sid must not be configured yet)."""
    p = call.params
    sid = await parse_sid(call, p["sid"], p.get("type"))
    await _check_group(call, p.get("group"))
    fields = {name: p.get(name) for name in RESOURCE_FIELDS}
    fields["state"] = _requested_state(p.get("state"))
    resource = call.command(HaResource, sid=sid, **fields)

    def add(document: HaResources) -> HaResources:
        if sid in document.resources:
            raise RucherError(
                ErrorCode.EXISTS,
                f"resource ID '{sid}' already defined",
                details={"field": "sid"},
            )
        return HaResources(resources={**document.resources, sid: resource})

    await store_of(call).change_resources(add)


@ROUTES("PUT", "/cluster/ha/resources/{sid}")
async def update_resource(call: Call) -> None:
    """Change options (``delete`` resets them to Proxmox's defaults), guarded by ``digest``."""
    p = call.params
    deleted = split_list(p.get("delete") or "")
    unknown = [name for name in deleted if name not in RESOURCE_FIELDS]
    if unknown:
        raise ParamError({"delete": f"invalid option '{unknown[0]}'"})
    await _check_group(call, p.get("group"))
    changes: dict[str, Any] = {name: p[name] for name in RESOURCE_FIELDS if p.get(name) is not None}
    if "state" in changes:
        changes["state"] = _requested_state(changes["state"])
    for name in deleted:
        changes[name] = getattr(RESOURCE_DEFAULTS, name)

    def update(document: HaResources) -> HaResources:
        sid = _sid_of_existing(document, p["sid"])
        values = msgspec.structs.asdict(document.resources[sid]) | changes
        try:
            resource = msgspec.convert(values, HaResource)
        except msgspec.ValidationError as err:
            raise ParamError({"parameters": str(err)}) from err
        return HaResources(resources={**document.resources, sid: resource})

    await store_of(call).change_resources(update, p.get("digest"))


@ROUTES("DELETE", "/cluster/ha/resources/{sid}")
async def delete_resource(call: Call) -> None:
    """Take a guest out of HA; with ``purge`` (the default) out of every rule naming it too."""
    store = store_of(call)
    removed: list[str] = []

    def remove(document: HaResources) -> HaResources:
        sid = _sid_of_existing(document, call.params["sid"])
        removed[:] = [sid]
        rest = {key: value for key, value in document.resources.items() if key != sid}
        return HaResources(resources=rest)

    await store.change_resources(remove)
    if call.params.get("purge") is False:
        return
    sid = removed[0]

    def purge(document: HaRules) -> HaRules:
        kept: dict[str, HaRule] = {}
        for name, rule in document.rules.items():
            members = tuple(member for member in rule.resources if member != sid)
            if members:
                kept[name] = msgspec.structs.replace(rule, resources=members)
        return HaRules(rules=kept)

    await store.change_rules(purge)


async def _move(call: Call, action: CrmAction) -> dict[str, Any]:
    p = call.params
    read = await store_of(call).resources()
    sid = _sid_of_existing(read.value, p["sid"])
    node = p["node"]
    if node not in call.gateway.model.nodes():
        raise ParamError({"node": f"no such cluster node '{node}'"})
    if action is CrmAction.MIGRATE and sid.startswith("ct:"):
        # Containers never live-migrate: Proxmox relocates them instead.
        action = CrmAction.RELOCATE
    request = CrmRequest(
        id=new_id(), action=action, sid=sid, target=node, user=call.authid, time=time.time()
    )
    await store_of(call).queue_request(request)
    return {
        "sid": sid,
        "requested-node": node,
        "comigrated-resources": [],
        "blocking-resources": [],
    }


@ROUTES("POST", "/cluster/ha/resources/{sid}/migrate")
async def migrate_resource(call: Call) -> dict[str, Any]:
    """Ask the manager to live-migrate the resource to ``node``."""
    return await _move(call, CrmAction.MIGRATE)


@ROUTES("POST", "/cluster/ha/resources/{sid}/relocate")
async def relocate_resource(call: Call) -> dict[str, Any]:
    """Ask the manager to stop the resource, move it to ``node`` and start it there."""
    return await _move(call, CrmAction.RELOCATE)


# Status, arming and maintenance --------------------------------------------------------------


@ROUTES("GET", "/cluster/ha/status")
async def status_index(call: Call) -> list[dict[str, str]]:
    """The status directory."""
    return [{"name": name} for name in ("current", "manager_status")]


@ROUTES("GET", "/cluster/ha/status/current")
async def status_current(call: Call) -> list[dict[str, Any]]:
    """Quorum, manager, each node and each resource, as ``ha-manager status`` shows them."""
    store = store_of(call)
    status, control = await store.manager_status(), (await store.control()).value
    nodes = call.gateway.model.nodes()
    local = call.gateway.bus.node
    entries: list[dict[str, Any]] = [
        {
            "id": "quorum",
            "type": "quorum",
            "node": local,
            "status": "OK" if sum(nodes.values()) * 2 > len(nodes) else "No quorum on node",
            "quorate": 1 if sum(nodes.values()) * 2 > len(nodes) else 0,
        }
    ]
    if status is not None:
        entries.append(
            {
                "id": "master",
                "type": "master",
                "node": status.master_node,
                "status": f"{status.master_node} (active, {time.ctime(status.timestamp)})",
                "timestamp": int(status.timestamp),
            }
        )
    for node, online in nodes.items():
        state = status.node_status.get(node) if status else None
        mode = "maintenance" if node in control.maintenance else "active" if online else "dead"
        entries.append(
            {
                "id": f"lrm:{node}",
                "type": "lrm",
                "node": node,
                "status": f"{node} ({mode}, {state.value if state else 'unknown'})",
            }
        )
    entries.append(
        {
            "id": "fencing",
            "type": "fencing",
            "armed-state": (status.armed_state.value if status else "armed")
            if control.armed
            else "disarmed",
            "resource-mode": control.disarm_mode.value if control.disarm_mode else None,
        }
    )
    resources = (await store.resources()).value.resources
    for sid, resource in sorted(resources.items()):
        service = status.service_status.get(sid) if status else None
        entry: dict[str, Any] = {
            "id": f"service:{sid}",
            "type": "service",
            "sid": sid,
            "request_state": resource.state.value,
            "max_restart": resource.max_restart,
            "max_relocate": resource.max_relocate,
        }
        if service is not None:
            entry |= {
                "node": service.node,
                "crm_state": service.state.value,
                "state": service.state.value,
                "status": f"{sid} ({service.node}, {service.state.value})",
            }
        else:
            entry["status"] = f"{sid} (queued, {resource.state.value})"
        entries.append(entry)
    return entries


@ROUTES("GET", "/cluster/ha/status/manager_status")
async def manager_status(call: Call) -> dict[str, Any]:
    """The manager's whole status as it last published it, and the administrator's wishes."""
    store = store_of(call)
    status = await store.manager_status()
    control = (await store.control()).value
    return {
        "manager_status": msgspec.to_builtins(status) if status else {},
        "control": msgspec.to_builtins(control),
        "quorum": {"node": call.gateway.bus.node, "quorate": "1"},
    }


@ROUTES("POST", "/cluster/ha/status/disarm-ha")
async def disarm(call: Call) -> None:
    """Disarm HA: the manager stops acting; resources freeze or are ignored meanwhile."""
    mode = DisarmMode(call.params["resource-mode"])
    await store_of(call).change_control(
        lambda control: msgspec.structs.replace(control, armed=False, disarm_mode=mode)
    )


@ROUTES("POST", "/cluster/ha/status/arm-ha")
async def arm(call: Call) -> None:
    """Arm HA again."""
    await store_of(call).change_control(
        lambda control: msgspec.structs.replace(control, armed=True, disarm_mode=None)
    )


@ROUTES("POST", MAINTENANCE_PATH)
async def node_maintenance(call: Call) -> None:
    """Rucher extension: put ``node`` in HA maintenance (``enable=1``) or take it out (``0``)."""
    node, enable = call.params["node"], bool(call.params["enable"])
    if enable and node not in call.gateway.model.nodes():
        raise ParamError({"node": f"no such cluster node '{node}'"})

    def change(control: HaControl) -> HaControl:
        others = tuple(n for n in control.maintenance if n != node)
        return msgspec.structs.replace(
            control, maintenance=tuple(sorted((*others, node))) if enable else others
        )

    await store_of(call).change_control(change)


def maintenance_endpoint(schema: ApiSchema) -> Endpoint:
    """The extension's endpoint: Proxmox's ``crm-command`` needs Sys.Console on ``/``."""
    node = schema.endpoint("GET", "/nodes/{node}/status").parameters.properties["node"]
    return Endpoint(
        method="POST",
        path=MAINTENANCE_PATH,
        name="ha_node_maintenance",
        description="Rucher extension: enable or disable HA maintenance mode of a node "
        "(Proxmox 9: ha-manager crm-command node-maintenance enable|disable NODE).",
        permissions=Permissions(check=("perm", "/", ["Sys.Console"])),
        allowtoken=True,
        protected=False,
        parameters=ParamsSpec(
            properties={
                "node": node,
                "enable": Param(type="boolean", description="1 enters maintenance, 0 leaves it."),
            }
        ),
        returns={"type": "null"},
    )


def extend(schema: ApiSchema) -> ApiSchema:
    """``schema`` with the HA maintenance extension."""
    if ("POST", MAINTENANCE_PATH) in schema.by_key:
        return schema
    return msgspec.structs.replace(
        schema, endpoints=(*schema.endpoints, maintenance_endpoint(schema))
    )
