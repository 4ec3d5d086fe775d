"""``GET /version``: the Proxmox API level Rucher implements, and Rucher's own identity."""

from __future__ import annotations

import hashlib
from typing import Any

from rucher.gateway.routing import Call, RouteTable

ROUTES = RouteTable()

PRODUCT = "rucher"


def repoid(version: str) -> str:
    """A stable hex id of this build, in the shape Proxmox gives its git revision."""
    return hashlib.sha256(f"{PRODUCT}-{version}".encode()).hexdigest()[:8]


@ROUTES("GET", "/version")
async def version(call: Call) -> dict[str, Any]:
    """Clients compare ``version``/``release`` with Proxmox releases; the rest names Rucher."""
    gateway = call.gateway
    release = gateway.schema.release
    return {
        "version": f"{release}.0",
        "release": release,
        "repoid": repoid(gateway.version),
        "console": "xtermjs",
        "product": PRODUCT,
        "product-version": gateway.version,
    }
