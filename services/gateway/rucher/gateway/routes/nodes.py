"""``/nodes`` and ``/nodes/{node}/status``: the cluster's nodes and what each offers."""

from __future__ import annotations

from typing import Any

from rucher.bus import RucherError
from rucher.gateway import present
from rucher.gateway.routes.cluster import NODE_AUDIT
from rucher.gateway.routing import Call, RouteTable
from rucher.proto.errors import ErrorCode

ROUTES = RouteTable()


@ROUTES("GET", "/nodes")
async def list_nodes(call: Call) -> list[dict[str, Any]]:
    """Every node; its figures only for callers with Sys.Audit on it, as Proxmox does."""
    model = call.gateway.model
    return [
        present.node_entry(
            node, online, model.capacity.get(node), call.allowed(f"/nodes/{node}", NODE_AUDIT)
        )
        for node, online in model.nodes().items()
    ]


@ROUTES("GET", "/nodes/{node}/status")
async def node_status(call: Call) -> dict[str, Any]:
    """The capacity and usage the node's agent last published."""
    node = call.params["node"]
    model = call.gateway.model
    if node not in model.nodes():
        raise RucherError(ErrorCode.NOT_FOUND, f"no such cluster node '{node}'")
    capacity = model.capacity.get(node)
    if capacity is None:
        raise RucherError(ErrorCode.UNAVAILABLE, f"node '{node}' has not reported its status")
    return present.node_status(capacity)
