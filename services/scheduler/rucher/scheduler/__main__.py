"""The scheduler's composition root: settings, view, claim store, feed, reaper, handlers."""

from __future__ import annotations

import asyncio
import contextlib
import time

from rucher.claims import BusEvents, KvClaimStore
from rucher.placement import ClusterView
from rucher.registry import instance_key
from rucher.scheduler.config import SchedulerSettings
from rucher.scheduler.feed import ClusterFeed
from rucher.scheduler.handlers import serve
from rucher.scheduler.reaper import ClaimReaper
from rucher.scheduler.service import SchedulerService
from rucher.service import ServiceContext, main


async def setup(context: ServiceContext) -> None:
    """Build the view from the cluster store, then answer placement requests."""
    settings = SchedulerSettings.from_env(context.settings)
    bus = context.bus
    candidate = instance_key(context.instance)
    events = BusEvents(bus)
    context.on_stop(events.drain)
    service = SchedulerService(
        ClusterView(cpu_overcommit=settings.cpu_overcommit),
        KvClaimStore(bus),
        events,
        settings,
        scheduler=candidate,
        clock=time.time,
    )
    feed = ClusterFeed(bus, service, agents=settings.agents)
    reaper = ClaimReaper(
        bus,
        service,
        candidate=candidate,
        ttl=settings.base.registry_ttl,
        sweep=settings.sweep,
        owners=lambda: feed.guest_nodes,
    )
    feed.on_guest = reaper.guest_moved
    await feed.start()
    context.on_stop(feed.stop)

    async def refresh() -> None:
        while True:
            await asyncio.sleep(settings.sweep)
            service.refresh_expired()

    refresher = asyncio.create_task(refresh(), name="scheduler-refresh")

    async def stop_refresh() -> None:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher

    context.on_stop(stop_refresh)
    reaper.start()
    context.on_stop(reaper.stop)
    consumer = await serve(bus, service)
    context.on_stop(consumer.stop)


if __name__ == "__main__":
    main("scheduler", setup)
