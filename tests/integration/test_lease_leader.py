"""A node's lease bucket led from the node's own NATS server stays writable when another dies."""

from __future__ import annotations

import asyncio
import time

import nats.errors
import pytest

from rucher.bus import Bus, RucherError
from rucher.bus.provision import lead_here
from rucher.leases import Lease, ensure_node_lease_bucket, node_lease_name

from .buses import connected, until

pytestmark = pytest.mark.slow


async def moved_to(bus: Bus, stream: str, server: str) -> None:
    """Ask until ``stream`` is led by ``server`` (the bus's own); fails with every attempt seen.

    An attempt may meet an election (no leader answers) or a replica the leader has not heard
    from lately (nothing asked); each is retried, as the HA agent's LocalLeader does.
    """
    seen: list[str] = []

    async def there() -> bool:
        try:
            await lead_here(bus, stream)
            cluster = (await bus.js.stream_info(stream)).cluster
        except (RucherError, nats.errors.Error) as err:
            seen.append(f"{type(err).__name__}: {err}")
            return False  # an election runs: no leader answers for a moment
        assert cluster is not None
        replicas = [
            f"{r.name}(current={r.current},seen={(r.active or 0) / 1e9:.2f}s ago)"
            for r in cluster.replicas or []
        ]
        seen.append(f"leader={cluster.leader} replicas={' '.join(replicas)}")
        return cluster.leader == server

    try:
        await until(there, timeout=40, every=0.5)
    except TimeoutError:
        pytest.fail(f"{stream} never led by {server}; attempts:\n" + "\n".join(seen))


async def test_the_lease_bucket_is_led_from_here_and_renews_through_another_servers_death(
    nats_cluster,
):
    first, second, third = nats_cluster.servers
    # Connected to the second server first, as a node's services are to their own.
    async with connected([second.url, first.url, third.url], node="x2", service="ha") as bus:
        assert bus.server_name == second.name
        bucket = await ensure_node_lease_bucket(bus, "x2")
        stream = f"KV_{bucket.name}"

        async def led_here() -> bool:
            return (await bus.js.stream_info(stream)).cluster.leader == second.name

        # However the election went, the leader is moved here (asked again until it is).
        await moved_to(bus, stream, second.name)
        assert await lead_here(bus, stream) == second.name  # nothing to move any more

        lease = Lease.named(bus, node_lease_name("x2"), holder="x2/ha", ttl=5.0)
        assert await lease.try_acquire()
        first.kill()  # a server that leads other streams, perhaps, never this one
        worst, last = 0.0, time.monotonic()
        until_at = last + 6.0
        while time.monotonic() < until_at:
            async with asyncio.timeout(2.0):
                await lease.renew()
            now = time.monotonic()
            worst, last = max(worst, now - last), now
            await asyncio.sleep(0.2)
        # Renewals never waited for an election (4-9 s after a leader's loss).
        assert worst < 1.0, worst
        assert await led_here()


async def test_a_stream_led_elsewhere_is_moved_to_the_asking_server(nats_cluster):
    first, _, third = nats_cluster.servers
    async with (
        connected([first.url], node="a", service="ha") as bus_a,
        connected([third.url], node="c", service="ha") as bus_c,
    ):
        bucket = await ensure_node_lease_bucket(bus_a, "moving")
        stream = f"KV_{bucket.name}"
        for bus, server in ((bus_a, first), (bus_c, third), (bus_a, first)):
            await moved_to(bus, stream, server.name)
