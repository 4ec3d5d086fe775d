"""Helpers for integration tests: connect provisioned buses to a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from rucher.bus import Bus
from rucher.bus.provision import provision
from rucher.proto.streams import BUCKETS, STREAMS, BucketDef, StreamDef


@contextlib.asynccontextmanager
async def connected(
    urls: str | list[str],
    *,
    node: str = "n1",
    service: str = "test",
    replicas: int | None = None,
    streams: tuple[StreamDef, ...] = STREAMS,
    buckets: tuple[BucketDef, ...] = BUCKETS,
) -> AsyncIterator[Bus]:
    """A bus with the streams and buckets provisioned (all by default), closed afterwards."""
    bus = await Bus.connect(urls, node=node, service=service)
    try:
        await provision(bus, streams, buckets, replicas=replicas)
        yield bus
    finally:
        await bus.close(grace=1.0)


async def until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, every: float = 0.02
) -> float:
    """Wait until ``condition`` holds; returns the seconds it took, fails the test on timeout."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return time.monotonic() - start
            await asyncio.sleep(every)
