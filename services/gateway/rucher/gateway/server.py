"""uvicorn, served inside the service's own event loop beside its bus connection.

The service runner owns the process's signals (SIGTERM drains every part of the service), so
uvicorn's own signal capture is switched off; stopping the service stops the HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from rucher.gateway.config import GatewaySettings


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The service runner handles SIGTERM and SIGINT."""
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Drop idle keep-alive connections at once, then let busy ones finish.

        Closing an idle TLS connection politely waits for the client's close_notify, which an
        idle client never sends: stopping would hang until the TLS shutdown timeout.
        """
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is None or cycle.response_complete:
                connection.transport.abort()
        await super().shutdown(sockets)


def server_config(app: ASGIApp, settings: GatewaySettings, **overrides: object) -> uvicorn.Config:
    """The uvicorn settings the gateway runs with (the benchmark reuses them)."""
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "ssl_certfile": str(settings.cert_file),
        "ssl_keyfile": str(settings.key_file),
        "http": "httptools",
        "loop": "none",
        "lifespan": "off",
        "access_log": False,
        "log_config": None,
        "server_header": False,
        "proxy_headers": False,
        "timeout_keep_alive": 30,
        "backlog": 1024,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


async def start_server(config: uvicorn.Config) -> tuple[EmbeddedServer, asyncio.Task[None]]:
    """Start serving and return once the socket listens (or raise if it cannot)."""
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(), name="gateway-http")
    while not server.started:
        if task.done():
            # uvicorn exits the process on a bind failure: report it as an error instead.
            error = task.exception()
            raise RuntimeError(
                f"the gateway could not listen on {config.host}:{config.port}"
            ) from (error if isinstance(error, BaseException) else None)
        await asyncio.sleep(0.02)
    return server, task


async def stop_server(server: EmbeddedServer, task: asyncio.Task[None]) -> None:
    """Stop accepting, let open requests finish, close."""
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await task
