"""``GET /nodes/{node}/qemu/{vmid}/rrddata``: a VM's time series, kept by its node's agent."""

from __future__ import annotations

from typing import Any

import msgspec

from rucher.bus import RucherError
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import compute
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType

ROUTES = RouteTable()


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/rrddata")
async def rrddata(call: Call) -> list[dict[str, Any]]:
    """70 points of ``timeframe`` consolidated by ``cf``, oldest first, as Proxmox answers."""
    p = call.params
    node, vmid = p["node"], p["vmid"]
    record = await call.gateway.guests.get(vmid)
    if record.node != node or record.type is not GuestType.QEMU:
        raise RucherError(
            ErrorCode.NOT_FOUND,
            f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist",
        )
    query = call.command(
        compute.VmRrdQuery, vmid=vmid, timeframe=p["timeframe"], cf=p["cf"] or "AVERAGE"
    )
    series = await call.ask(compute.GUEST_RRDDATA.to(node=node), query)
    return [
        {name: value for name, value in msgspec.structs.asdict(point).items() if value is not None}
        for point in series.points
    ]
