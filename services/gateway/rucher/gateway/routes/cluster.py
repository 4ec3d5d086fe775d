"""``/cluster``: membership, the resource list, and the next free VMID."""

from __future__ import annotations

from typing import Any

import msgspec

from rucher.gateway import present
from rucher.gateway.dialect import Encoded
from rucher.gateway.routing import Call, RouteTable

ROUTES = RouteTable()

_encoder = msgspec.json.Encoder()

# Who sees a listed object: one of these privileges on its path (PVE::API2::Cluster resources).
VM_AUDIT = ("VM.Audit",)
NODE_AUDIT = ("Sys.Audit",)
STORAGE_AUDIT = ("Datastore.Audit", "Datastore.AllocateSpace")


@ROUTES("GET", "/cluster/status")
async def cluster_status(call: Call) -> list[dict[str, Any]]:
    """The cluster and its nodes: online when a service of the node holds its registration."""
    gateway = call.gateway
    nodes = gateway.model.nodes()
    online = sum(nodes.values())
    entries: list[dict[str, Any]] = [
        {
            "type": "cluster",
            "id": "cluster",
            "name": gateway.settings.cluster_name,
            "nodes": len(nodes),
            "quorate": 1 if online * 2 > len(nodes) else 0,
            "version": 1,
        }
    ]
    for nodeid, (node, is_online) in enumerate(nodes.items(), start=1):
        entries.append(
            {
                "type": "node",
                "id": f"node/{node}",
                "name": node,
                "nodeid": nodeid,
                "ip": gateway.model.node_address(node),
                "online": 1 if is_online else 0,
                "local": 1 if node == gateway.bus.node else 0,
                "level": "",
            }
        )
    return entries


@ROUTES("GET", "/cluster/resources")
async def cluster_resources(call: Call) -> Encoded:
    """Guests, nodes and storages the caller may see, served from memory and cached."""
    kind = call.params.get("type")
    gateway = call.gateway
    return Encoded(
        gateway.answers.get_or_build(
            ("resources", call.authid, kind),
            gateway.stamp(),
            lambda: _encoder.encode(_resources(call, kind)),
        )
    )


def _resources(call: Call, kind: str | None) -> list[dict[str, Any]]:
    model = call.gateway.model
    resources: list[dict[str, Any]] = []
    if kind in {None, "vm"}:
        pools = {
            vmid: pool.poolid
            for pool in call.gateway.view.state.pools.values()
            for vmid in pool.vms
        }
        for vmid, record in sorted(model.guests.items()):
            if not call.allowed(f"/vms/{vmid}", VM_AUDIT):
                continue
            capacity = model.capacity.get(record.node)
            resources.append(
                present.guest_resource(
                    record,
                    model.guest_state.get(vmid),
                    pools.get(vmid),
                    capacity.cpus if capacity else 0,
                )
            )
    if kind in {None, "node"}:
        for node, online in model.nodes().items():
            stats = call.allowed(f"/nodes/{node}", NODE_AUDIT)
            resources.append(present.node_resource(node, online, model.capacity.get(node), stats))
    if kind in {None, "storage"}:
        for node, statuses in sorted(model.storages.items()):
            resources.extend(
                present.storage_resource(node, status)
                for status in statuses
                if call.allowed(f"/storage/{status.storage}", STORAGE_AUDIT, any_=True)
            )
    return resources


@ROUTES("GET", "/cluster/nextid")
async def next_id(call: Call) -> int:
    """The lowest free VMID, or ``vmid`` itself when it is free (GuestRegistry.next_id)."""
    return await call.gateway.guests.next_id(call.params.get("vmid"))
