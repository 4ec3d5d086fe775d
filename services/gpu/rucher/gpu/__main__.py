"""The GPU broker's composition root: settings, host drivers, stores, reconcile, subjects.

NVML is loaded only when ``RUCHER_GPU_NVML`` is ``auto`` and an NVIDIA driver answers; without
one the broker still serves PCI passthrough, mdevs and VFs from sysfs.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from rucher.bus import RucherError
from rucher.gpu.config import GpuSettings
from rucher.gpu.drivers.interface import Nvml
from rucher.gpu.drivers.nvml import PynvmlApi, load_pynvml
from rucher.gpu.drivers.sysfs import HostSysfs
from rucher.gpu.handlers import serve
from rucher.gpu.host import Host, HostError
from rucher.gpu.mappings import Mappings
from rucher.gpu.pciids import PciNames
from rucher.gpu.service import GpuBroker
from rucher.gpu.store import BusEvents, KvGuestDirectory, KvLeaseStore, KvMappings
from rucher.proto.gpu import PCI_LIST, PciDevice, PciListQuery
from rucher.service import ServiceContext, main

log = structlog.get_logger("rucher.gpu")
LIST_TIMEOUT = 10.0


def load_nvml(mode: str) -> Nvml | None:
    """NVML when asked for and present."""
    if mode == "off":
        return None
    library = load_pynvml()
    return PynvmlApi(library) if library is not None else None


async def rediscover(broker: GpuBroker, interval: float) -> None:
    """Read the host again every ``interval`` seconds; publish what changed."""
    while True:
        await asyncio.sleep(interval)
        try:
            await broker.rediscover()
        except (RucherError, HostError, OSError) as err:
            log.warning("rediscovery_failed", error=str(err))


async def setup(context: ServiceContext) -> None:
    """Build the broker, reconcile with host and store, then serve."""
    settings = GpuSettings.from_env(context.settings)
    bus = context.bus
    nvml = await asyncio.to_thread(load_nvml, settings.nvml)
    log.info("gpu_host", sysfs=str(settings.sysfs_root), nvml=nvml is not None,
             pci_ids=str(settings.pci_ids) if settings.pci_ids else None)  # fmt: skip
    book = KvMappings(bus)
    broker = GpuBroker(
        bus.node,
        Host(HostSysfs(settings.sysfs_root), nvml, PciNames(settings.pci_ids)),
        KvLeaseStore(bus, bus.node),
        BusEvents(bus),
        book,
        KvGuestDirectory(bus, bus.node),
        release_grace=settings.release_grace,
    )
    await broker.reconcile()

    async def devices_of(node: str) -> list[PciDevice]:
        listing = await bus.request(PCI_LIST.to(node=node), PciListQuery(), timeout=LIST_TIMEOUT)
        return list(listing.devices)

    consumer, subscriptions = await serve(bus, broker, Mappings(book, devices_of))
    context.on_stop(consumer.stop)
    loop = asyncio.create_task(rediscover(broker, settings.discovery_interval))

    async def stop() -> None:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    context.on_stop(stop)


if __name__ == "__main__":
    main("gpu", setup)
