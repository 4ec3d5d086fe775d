"""The HA service on one node: ``python -m rucher.ha``.

Composition root: read the settings, follow the HA guest set, hold the node's lease under the
watchdog (with its guard process), follow the cluster store, then run the CRM (the elected
manager's rounds) and the LRM (this node's guests) over the live environment until stopped.
When stopped, the LRM first applies the shutdown policy, and the watchdog then releases the
node lease if no HA guest is left running here.
"""

from __future__ import annotations

import contextlib
from importlib import metadata

import nats.errors

from rucher.ha.config import HaNodeSettings
from rucher.ha.handlers import follow_capacity, follow_manager
from rucher.ha.lease import start_node_watchdog
from rucher.ha.live.actions import ClusterActions
from rucher.ha.live.cache import ClusterCache, node_holder
from rucher.ha.live.settings import LiveSettings
from rucher.ha.service import HaService, reboot_requested
from rucher.service import ServiceContext, main

VERSION = metadata.version("rucher-ha")


async def setup(context: ServiceContext) -> None:
    """Hold the node lease under the watchdog, follow the store, then run the rounds."""
    settings = HaNodeSettings.from_env(context.settings)
    live = LiveSettings.from_env()
    bus = context.bus
    watchdog, guests, leader = await start_node_watchdog(
        bus,
        settings.watchdog,
        holder=node_holder(bus.node),
        state_dir=context.settings.state_dir,
    )
    # Stopped last: with HA guests still running here its guard kills them on the way out.
    context.on_stop(watchdog.stop)
    context.on_stop(guests.stop)
    context.on_stop(leader.stop)
    cache = ClusterCache(bus)
    await cache.start()
    context.on_stop(cache.stop)
    actions = ClusterActions(
        bus,
        lease_ttl=settings.watchdog.lease_ttl,
        epoch=lambda: watchdog.epoch,
        fence_hook=settings.fence_hook,
    )
    service = HaService(
        node=bus.node, cache=cache, actions=actions, epoch=lambda: watchdog.epoch, settings=live
    )
    subscriptions = [await follow_capacity(bus, service), await follow_manager(bus, service)]

    async def unsubscribe() -> None:
        for subscription in subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    context.on_stop(unsubscribe)
    await service.start()
    context.on_stop(service.stop)
    # Run first on SIGTERM (the node goes down): the shutdown policy, within the runner's grace.
    limit = min(live.shutdown_timeout, max(context.settings.shutdown_grace - 1.0, 0.0))

    async def going_down() -> None:
        reboot = reboot_requested(context.settings.state_dir)
        await service.shut_down(reboot=reboot, timeout=limit)

    context.on_stop(going_down)


if __name__ == "__main__":
    main("ha", setup, version=VERSION)
