"""The HA configuration store over real NATS: digests, compare-and-set, queued requests."""

from __future__ import annotations

import asyncio
import time

import pytest

from rucher.bus import RucherError
from rucher.haconfig import HaConfigStore, digest
from rucher.proto.errors import ErrorCode
from rucher.proto.ha import CrmAction, CrmRequest, HaResource, HaResources

from .buses import connected

pytestmark = pytest.mark.integration


def adding(sid: str):
    def change(document: HaResources) -> HaResources:
        return HaResources(resources={**document.resources, sid: HaResource(sid=sid)})

    return change


async def test_concurrent_writers_both_land_and_a_stale_digest_is_refused(nats_server):
    async with connected(nats_server.url, service="hatest") as bus:
        store = HaConfigStore(bus)
        empty = await store.resources()
        assert empty.revision == 0 and empty.value == HaResources()
        assert empty.digest == digest(HaResources())
        # Twenty writers at once, no digest: compare-and-set retries until each lands.
        await asyncio.gather(*(store.change_resources(adding(f"vm:{100 + i}")) for i in range(20)))
        read = await store.resources()
        assert sorted(read.value.resources) == [f"vm:{100 + i}" for i in range(20)]
        await store.change_resources(adding("vm:200"), read.digest)
        with pytest.raises(RucherError) as caught:
            await store.change_resources(adding("vm:201"), read.digest)
        assert caught.value.code is ErrorCode.CONFLICT
        assert "detected modified configuration" in caught.value.message
        assert "vm:201" not in (await store.resources()).value.resources


async def test_the_digest_does_not_depend_on_insertion_order():
    first = HaResources(
        resources={"vm:100": HaResource(sid="vm:100"), "vm:101": HaResource(sid="vm:101")}
    )
    second = HaResources(
        resources={"vm:101": HaResource(sid="vm:101"), "vm:100": HaResource(sid="vm:100")}
    )
    assert digest(first) == digest(second)


async def test_requests_are_queued_in_order_and_taken(nats_server):
    async with connected(nats_server.url, service="hatest") as bus:
        store = HaConfigStore(bus)
        requests = [
            CrmRequest(
                id=f"r{i}",
                action=CrmAction.MIGRATE,
                sid="vm:100",
                target="n2",
                user="root@pam",
                time=time.time() + i,
            )
            for i in range(3)
        ]
        for request in reversed(requests):
            await store.queue_request(request)
        assert [r.id for r in await store.requests()] == ["r0", "r1", "r2"]
        await store.take_request(requests[0])
        assert [r.id for r in await store.requests()] == ["r1", "r2"]
        assert await store.manager_status() is None
