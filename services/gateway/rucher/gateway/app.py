"""The gateway's ASGI application: the Proxmox endpoints, OpenAPI, and one log line a request.

Anything not implemented gets Proxmox's answer (501, "Method ... not implemented").
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import msgspec
import structlog
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rucher.gateway import dialect, openapi
from rucher.gateway.routes import (
    access,
    cluster,
    ha,
    ha_rules,
    hardware,
    mapping,
    nodes,
    placement,
    pools,
    qemu,
    qemu_console,
    qemu_migrate,
    qemu_rrd,
    qemu_snapshot,
    storage,
    tasks,
    users,
    version,
)
from rucher.gateway.routing import API_PREFIX, Gateway, Handler, RouteTable, build_route

OPENAPI_PATH = "/api2/openapi.json"
ROUTE_TABLES: tuple[RouteTable, ...] = (
    version.ROUTES,
    cluster.ROUTES,
    ha.ROUTES,
    ha_rules.ROUTES,
    nodes.ROUTES,
    qemu.ROUTES,
    qemu_migrate.ROUTES,
    qemu_console.ROUTES,
    qemu_rrd.ROUTES,
    qemu_snapshot.ROUTES,
    placement.ROUTES,
    storage.ROUTES,
    hardware.ROUTES,
    mapping.ROUTES,
    tasks.ROUTES,
    pools.ROUTES,
    access.ROUTES,
    users.ROUTES,
)

access_log = structlog.get_logger("rucher.gateway.access")


class AccessLog:
    """One structured line per request: user, method, path, status, duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request, then log it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            client = scope.get("client")
            access_log.info(
                "http_request",
                user=scope.get("state", {}).get("user"),
                method=scope["method"],
                path=scope["path"],
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 3),
                client=client[0] if client else None,
            )


def handlers(tables: Iterable[RouteTable]) -> dict[tuple[str, str], Handler]:
    """Every declared handler by ``(method, path)``; a path declared twice is refused."""
    merged: dict[tuple[str, str], Handler] = {}
    for table in tables:
        for key, handler in table.handlers.items():
            if key in merged:
                raise ValueError(f"{key} declared in two route tables")
            merged[key] = handler
    return merged


def create_app(gateway: Gateway) -> FastAPI:
    """The application serving ``gateway``; the schema and the handlers must match exactly.

    The schema served is Proxmox's plus Rucher's documented extensions (``POST /cluster/qemu``).
    """
    declared = handlers(ROUTE_TABLES)
    schema = ha.extend(placement.extend(gateway.schema))
    expected = set(schema.by_key)
    if set(declared) != expected:
        missing = sorted(expected - set(declared))
        extra = sorted(set(declared) - expected)
        raise ValueError(f"schema and handlers differ: missing {missing}, not in schema {extra}")
    app = FastAPI(
        title="Rucher", version=gateway.version, openapi_url=None, docs_url=None, redoc_url=None
    )
    for endpoint in schema.endpoints:
        app.router.routes.append(build_route(endpoint, declared[endpoint.key], gateway))
    document = msgspec.json.encode(openapi.build(schema, API_PREFIX, gateway.version))

    async def openapi_document(request: Request) -> Response:
        return Response(document, media_type="application/json")

    async def not_implemented(request: Request) -> Response:
        return dialect.failure(501, f"Method '{request.method} {request.url.path}' not implemented")

    app.router.routes.extend(qemu_console.websocket_routes(gateway))
    app.router.routes.append(Route(OPENAPI_PATH, openapi_document, methods=["GET"]))
    app.router.routes.append(
        Route(
            "/{rest:path}",
            not_implemented,
            methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
        )
    )
    app.add_middleware(AccessLog)
    return app
