"""The storage service's composition root: settings, buckets, drivers, subjects, status."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from rucher.bus import RucherError
from rucher.service import ServiceContext, main
from rucher.storage.adapters import (
    AppliedReplies,
    BusEvents,
    HttpFetcher,
    KvDefinitionBook,
    KvGuestDirectory,
    ObjectUploads,
    follow_volume_changes,
)
from rucher.storage.config import StorageSettings
from rucher.storage.copies import Copier
from rucher.storage.definitions import DEFAULT_LOCAL, Definitions
from rucher.storage.drivers import NodeContext
from rucher.storage.drivers.qemu_img import QemuImg
from rucher.storage.handlers import serve
from rucher.storage.pool import DriverPool
from rucher.storage.service import StorageService
from rucher.storage.transfer import Transfers

log = structlog.get_logger("rucher.storage")


async def publish_status(storage: StorageService, interval: float) -> None:
    """Publish this node's storages and their usage now and every ``interval`` seconds."""
    while True:
        try:
            await storage.publish_status()
        except RucherError as err:
            log.warning("status_not_published", error=err.message)
        await asyncio.sleep(interval)


async def setup(context: ServiceContext) -> None:
    """Build the storage service and serve its subjects."""
    settings = StorageSettings.from_env(context.settings)
    bus = context.bus
    book = KvDefinitionBook(bus)
    await book.start()
    context.on_stop(book.stop)
    events = BusEvents(bus)
    context.on_stop(events.drain)
    definitions = Definitions(book, events, bus.node)
    await definitions.ensure(DEFAULT_LOCAL)
    if settings.ceph is not None:
        await definitions.ensure(settings.ceph.definition, settings.ceph.key, overwrite=True)
    node = NodeContext(local_path=settings.local_path, qemu_img=QemuImg(settings.qemu_img))
    pool = DriverPool(node=bus.node, book=book, context=node)
    context.on_stop(pool.close)
    context.on_stop(await follow_volume_changes(bus, pool.forget))
    copier = Copier(pool, settings.staging)
    storage = StorageService(
        node=bus.node, pool=pool, guests=KvGuestDirectory(bus), events=events, copier=copier
    )
    transfers = Transfers(
        node=bus.node,
        pool=pool,
        tasks=context.tasks,
        uploads=ObjectUploads(bus, idle_timeout=settings.transfer_timeout),
        fetcher=HttpFetcher(timeout=settings.transfer_timeout),
        events=events,
        copier=copier,
    )
    replies = AppliedReplies(bus)

    async def others_on_node() -> bool:
        """Whether another storage instance (a predecessor still stopping) is registered here."""
        running = await context.registry.instances(context.instance.service, bus.node)
        return any(other.instance != context.instance.instance for other in running)

    await replies.start(others_on_node)
    context.on_stop(replies.stop)
    await serve(bus, storage, definitions, transfers, replies)
    publisher = asyncio.create_task(publish_status(storage, settings.status_interval))

    async def stop_publishing() -> None:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher

    context.on_stop(stop_publishing)


if __name__ == "__main__":
    main("storage", setup)
