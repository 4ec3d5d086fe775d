"""The gateway service: ``python -m rucher.gateway``.

Composition root: read the settings, make the TLS certificate if none was supplied, load the
Proxmox schema shipped in this package, start the IAM view and the read model, then serve the
API with uvicorn in the service's event loop (uvloop) until the service stops.
"""

from __future__ import annotations

from importlib import metadata, resources

import uvloop

from rucher.authz import AuthzView
from rucher.gateway.app import create_app
from rucher.gateway.certs import ensure_in_child
from rucher.gateway.config import GatewaySettings
from rucher.gateway.readmodel import ReadModel
from rucher.gateway.routing import Gateway, Rebuilds
from rucher.gateway.server import server_config, start_server, stop_server
from rucher.guests import GuestRegistry
from rucher.pve.schema import ApiSchema, load_schema
from rucher.service import ServiceContext, main
from rucher.tasks import TaskStore

VERSION = metadata.version("rucher-gateway")


def bundled_schema() -> ApiSchema:
    """The Proxmox schema extracted at build time (ops/gen-pve-schema)."""
    return load_schema(resources.files("rucher.gateway").joinpath("pve_schema.json").read_bytes())


async def setup(context: ServiceContext) -> None:
    """Wire the gateway and start serving."""
    settings = GatewaySettings.from_env(context.settings)
    if settings.generated_cert:
        await ensure_in_child(settings.cert_file, settings.key_file, node=context.settings.node)
    view = AuthzView(context.bus)
    await view.start()
    context.on_stop(view.stop)
    model = ReadModel(context.bus)
    await model.start()
    context.on_stop(model.stop)
    gateway = Gateway(
        bus=context.bus,
        view=view,
        model=model,
        tasks=TaskStore(context.bus),
        guests=GuestRegistry(context.bus),
        schema=bundled_schema(),
        rebuilds=Rebuilds(view),
        settings=settings,
        version=VERSION,
    )
    config = server_config(
        create_app(gateway), settings, timeout_graceful_shutdown=context.settings.shutdown_grace
    )
    server, task = await start_server(config)

    async def stop() -> None:
        await stop_server(server, task)

    context.on_stop(stop)


if __name__ == "__main__":
    uvloop.install()
    main("gateway", setup, version=VERSION)
