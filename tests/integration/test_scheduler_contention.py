"""Scheduler processes on a 3-node NATS cluster racing for the same nodes: no over-commit."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.scheduler import GUEST_PLACE

from .buses import connected
from .test_scheduler import (
    GIB,
    add_nodes,
    allocations,
    place,
    start_scheduler,
    stop,
    wait_ready,
    wait_serving,
)

pytestmark = pytest.mark.integration

NODES = [f"n{i:02}" for i in range(12)]
NODE_MEMORY = 16 * GIB
GUEST_MEMORY = 3 * GIB
FITS = len(NODES) * (NODE_MEMORY // GUEST_MEMORY)


async def test_racing_schedulers_never_overcommit_and_fill_the_cluster(nats_cluster, tmp_path):
    urls = nats_cluster.urls
    async with contextlib.AsyncExitStack() as stack:
        # NATS prefers a queue member on the requester's own server: one client and one
        # scheduler per server spreads the requests over all three schedulers.
        clients = [
            await stack.enter_async_context(
                connected(url, node=f"c{n}", service="test-client", replicas=3)
            )
            for n, url in enumerate(urls)
        ]
        await add_nodes(clients[0], NODES, memory=NODE_MEMORY, cpus=64)
        processes = [
            start_scheduler(url, tmp_path / f"s{n}", node=f"s{n}", RUCHER_JS_REPLICAS="3")
            for n, url in enumerate(urls)
        ]
        try:
            for process in processes:
                await wait_ready(clients[0], process)
            await wait_serving(clients[0], len(processes))

            async def attempt(vmid: int) -> ErrorCode | None:
                command = place(vmid, memory=GUEST_MEMORY, ttl=300)
                try:
                    await clients[vmid % 3].request(GUEST_PLACE.address, command, timeout=20)
                except RucherError as err:
                    return err.code
                return None

            # Twice as many concurrent requests as fit: the schedulers race for every node.
            outcomes = await asyncio.gather(*(attempt(100 + n) for n in range(2 * FITS)))
            placed = outcomes.count(None)
            assert set(outcomes) <= {None, ErrorCode.UNAVAILABLE}
            # Whatever lost a race too often was refused as retryable: fill the rest one by one.
            vmid = 1000
            while await attempt(vmid) is None:
                placed += 1
                vmid += 1
            assert placed == FITS
            schedulers = set()
            for node in NODES:
                document = await allocations(clients[0], node)
                assert document is not None
                held = sum(claim.resources.memory for claim in document.claims)
                assert held <= NODE_MEMORY, f"{node} over-committed: {held / GIB} GiB"
                assert len(document.claims) == NODE_MEMORY // GUEST_MEMORY
                schedulers |= {claim.scheduler for claim in document.claims}
            assert len(schedulers) >= 2  # the claims really came from competing processes
        finally:
            for process in processes:
                stop(process)
