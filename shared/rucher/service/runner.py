"""The service runner: everything a Rucher service process does around its own logic."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
import structlog

from rucher.bus import Bus, RucherError
from rucher.bus.provision import provision
from rucher.leases import Lease
from rucher.proto.node import ServiceInstance
from rucher.registry import ServiceRegistry, describe_self, instance_key
from rucher.service.logging import configure_logging
from rucher.service.settings import Settings
from rucher.tasks import TaskReaper, TaskRunner

log = structlog.get_logger("rucher.service")

CONNECT_PATIENCE = 60.0
STEP_PATIENCE = 3.0
Cleanup = Callable[[], Awaitable[None]]


@dataclass
class ServiceContext:
    """What a service's set-up function receives: its settings, bus, tasks and registration."""

    settings: Settings
    bus: Bus
    instance: ServiceInstance
    registry: ServiceRegistry
    tasks: TaskRunner
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _cleanups: list[Cleanup] = field(default_factory=list)

    def on_stop(self, cleanup: Cleanup) -> None:
        """Run ``cleanup`` at shutdown (last registered runs first)."""
        self._cleanups.append(cleanup)


Setup = Callable[[ServiceContext], Awaitable[None]]


async def connect(settings: Settings, version: str) -> Bus:
    """Connect to NATS, waiting up to a minute for it to come up (services may start first)."""
    deadline = time.monotonic() + CONNECT_PATIENCE
    while True:
        try:
            return await Bus.connect(
                list(settings.nats_urls),
                node=settings.node,
                service=settings.service,
                version=version,
            )
        except (OSError, nats.errors.NoServersError, TimeoutError) as err:
            if time.monotonic() > deadline:
                raise
            log.warning("nats_unreachable", urls=settings.nats_urls, error=repr(err))
            await asyncio.sleep(1.0)


async def run_service(
    settings: Settings, setup: Setup, *, version: str = "0.1.0", ready: Cleanup | None = None
) -> None:
    """Start, register, run ``setup``, serve until SIGTERM/SIGINT, then drain and deregister."""
    bus = await connect(settings, version)
    await provision(bus, replicas=settings.js_replicas)
    await bus.micro_service()  # discoverable even before (or without) any RPC endpoint
    registry = ServiceRegistry(bus)
    instance = describe_self(bus)
    key = instance_key(instance)
    lease_box: list[Lease] = []
    stopping = asyncio.Event()

    async def reregister() -> None:
        # The registration lapsed (NATS unreachable longer than its TTL): take it back.
        while not stopping.is_set():
            try:
                lease = await registry.register(instance, ttl=settings.registry_ttl)
            except (RucherError, TimeoutError):
                await asyncio.sleep(1.0)
                continue
            lease.on_lost = reregister
            lease_box[0] = lease
            log.info("registration_restored", key=key)
            return

    lease_box.append(
        await registry.register(instance, ttl=settings.registry_ttl, on_lost=reregister)
    )
    tasks = TaskRunner(bus, worker=key)
    await tasks.start()
    # The reaper's own liveness is as tight as a registration's: a dead reaper is replaced
    # within one registry TTL, so orphaned tasks end within about two.
    reaper = TaskReaper(bus, candidate=key, ttl=settings.registry_ttl)
    reaper.start()
    context = ServiceContext(
        settings=settings,
        bus=bus,
        instance=instance,
        registry=registry,
        tasks=tasks,
        stopping=stopping,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, context.stopping.set)
    try:
        await setup(context)
        log.info("service_started", instance=instance.instance, pid=instance.pid)
        if ready is not None:
            await ready()
        await context.stopping.wait()
    finally:
        log.info("service_stopping")
        await _shut_down(context, reaper, lease_box[0])
        log.info("service_stopped")


async def _shut_down(context: ServiceContext, reaper: TaskReaper, lease: Lease) -> None:
    """Stop in order, each step bounded: a NATS that is gone must not keep the process alive.

    Running tasks get the grace period; deregistering is best effort (the lease expires by
    itself); the connection is drained if NATS is reachable and closed otherwise.
    """
    grace = context.settings.shutdown_grace
    for cleanup in reversed(context._cleanups):
        with contextlib.suppress(RucherError, TimeoutError):
            async with asyncio.timeout(grace):
                await cleanup()
    await context.tasks.close(grace)
    for step in (reaper.stop, lease.release):
        with contextlib.suppress(RucherError, TimeoutError):
            async with asyncio.timeout(STEP_PATIENCE):
                await step()
    await context.bus.close(grace=grace)


def main(service: str, setup: Setup, *, version: str = "0.1.0") -> None:
    """The body of every service's ``__main__``: settings, logging, run until stopped."""
    settings = Settings.from_env(service)
    configure_logging(settings.log_format, settings.log_level, service=service, node=settings.node)
    asyncio.run(run_service(settings, setup, version=version))
