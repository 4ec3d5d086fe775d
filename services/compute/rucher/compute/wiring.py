"""Composition of the agent's console sessions and rrd sampler (called by ``__main__``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from rucher.bus import Bus, RucherError
from rucher.bus.bytestream import ByteStream
from rucher.compute.config import ComputeSettings
from rucher.compute.console import ConsoleSessions
from rucher.compute.drivers.libvirt_console import LibvirtConsoles
from rucher.compute.drivers.libvirt_stats import LibvirtStats
from rucher.compute.rrd import RrdService, RrdStore
from rucher.compute.service import ComputeService
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType
from rucher.service import ServiceContext


class ServicePower:
    """A domain's power state through the compute service's hypervisor."""

    def __init__(self, service: ComputeService) -> None:
        self.service = service

    async def power(self, domain: str) -> PowerState:
        """The domain's state (stopped when not defined)."""
        info = await self.service.hypervisor.info(domain)
        return PowerState.STOPPED if info is None else info.state


def console_streams(bus: Bus) -> Callable[[str], ByteStream]:
    """The agent's end of a console session: it sends on ``.out`` and reads ``.in``."""

    def make(session: str) -> ByteStream:
        return ByteStream(
            bus.nc,
            outgoing=compute.CONSOLE_DATA.out(node=bus.node, session=session),
            incoming=compute.CONSOLE_DATA.in_(node=bus.node, session=session),
        )

    return make


def _handler(
    operation: Callable[[Any], Awaitable[Any]],
) -> Callable[[Any, dict[str, str]], Awaitable[Any]]:
    async def handle(message: Any, _headers: dict[str, str]) -> Any:
        return await operation(message)

    return handle


async def serve_console_and_rrd(
    context: ServiceContext, settings: ComputeSettings, service: ComputeService
) -> None:
    """Answer ``console_open`` and ``guest_rrddata`` for this node and start the rrd sampler."""
    bus = context.bus
    sessions = ConsoleSessions(
        service.guests,
        service.tasks,
        LibvirtConsoles(settings.libvirt_uri),
        console_streams(bus),
        ServicePower(service),
        node=service.node,
    )

    async def owned(vmid: int) -> object:
        record = await service.guests.get(vmid)
        if record.node != service.node or record.type is not GuestType.QEMU:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"Configuration file 'nodes/{service.node}/qemu-server/{vmid}.conf' does not exist",
            )
        return record

    rrd = RrdService(
        LibvirtStats(settings.libvirt_uri), RrdStore(), owned, interval=settings.rrd_interval
    )
    sampler = asyncio.create_task(rrd.run(), name="compute-rrd")

    async def stop_sampler() -> None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler

    context.on_stop(stop_sampler)
    await bus.serve(compute.CONSOLE_OPEN, _handler(sessions.open), node=service.node)
    await bus.serve(compute.GUEST_RRDDATA, _handler(rrd.rrddata), node=service.node)
