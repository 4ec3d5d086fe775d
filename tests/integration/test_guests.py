"""The guest registry against real NATS: VMIDs, digests, locks and ownership."""

from __future__ import annotations

import asyncio

import pytest

from rucher.bus import RucherError
from rucher.guests import MODIFIED, GuestRegistry, config_digest
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestType

from .buses import connected

pytestmark = pytest.mark.integration


async def test_vmids_are_unique_across_vms_and_containers_under_concurrency(nats_server):
    async with connected(nats_server.url) as a, connected(nats_server.url, node="n2") as b:
        registries = [GuestRegistry(a), GuestRegistry(b)]
        assert await registries[0].next_id() == 100
        created = await asyncio.gather(
            *(
                registries[n % 2].register(
                    guest_type=GuestType.QEMU if n % 3 else GuestType.LXC,
                    node=f"n{n % 2 + 1}",
                    config={"memory": "512"},
                )
                for n in range(24)
            )
        )
        vmids = sorted(record.vmid for record in created)
        assert vmids == list(range(100, 124))
        assert await registries[0].next_id() == 124
        assert {r.type for r in await registries[1].list()} == {GuestType.QEMU, GuestType.LXC}
        assert len(await registries[1].list(node="n1")) == 12

        with pytest.raises(RucherError) as taken:
            await registries[0].next_id(105)
        assert taken.value.code is ErrorCode.EXISTS and taken.value.details == {"field": "vmid"}
        with pytest.raises(RucherError) as again:
            await registries[0].register(guest_type=GuestType.QEMU, node="n1", config={}, vmid=105)
        assert again.value.message == "VM 105 already exists"
        with pytest.raises(RucherError) as low:
            await registries[0].next_id(99)
        assert low.value.code is ErrorCode.INVALID
        assert await registries[0].next_id(500) == 500


async def test_two_writers_with_the_same_digest_exactly_one_wins(nats_server):
    async with connected(nats_server.url) as a, connected(nats_server.url, node="n2") as b:
        first, second = GuestRegistry(a), GuestRegistry(b)
        record = await first.register(
            guest_type=GuestType.QEMU, node="n1", config={"memory": "512"}, lock=None
        )
        seen = record.digest
        assert seen == config_digest({"memory": "512"}, None)

        results = await asyncio.gather(
            first.update(record.vmid, changes={"memory": "1024"}, digest=seen),
            second.update(record.vmid, changes={"cores": "4"}, digest=seen),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, RucherError)]
        assert len(winners) == 1 and len(losers) == 1
        assert losers[0].code is ErrorCode.CONFLICT and losers[0].message == MODIFIED
        current = await second.get(record.vmid)
        assert current == winners[0]
        assert current.digest != seen
        # Without a digest, writes serialise instead of conflicting.
        await asyncio.gather(
            first.update(record.vmid, changes={"name": "a"}),
            second.update(record.vmid, changes={"tags": "b"}),
        )
        assert {"name", "tags"} <= set((await first.get(record.vmid)).config)


async def test_locks_refuse_other_writers_until_cleared(nats_server):
    async with connected(nats_server.url) as bus:
        guests = GuestRegistry(bus)
        record = await guests.register(guest_type=GuestType.QEMU, node="n1", config={})
        assert record.lock is GuestLock.CREATE
        with pytest.raises(RucherError) as locked:
            await guests.update(record.vmid, changes={"memory": "1"})
        assert (locked.value.code, locked.value.message) == (
            ErrorCode.LOCKED,
            "VM is locked (create)",
        )
        await guests.update(record.vmid, changes={"memory": "1"}, lock_held=GuestLock.CREATE)
        await guests.clear_lock(record.vmid, GuestLock.CREATE)
        await guests.set_lock(record.vmid, GuestLock.BACKUP)
        with pytest.raises(RucherError):
            await guests.set_lock(record.vmid, GuestLock.MIGRATE)
        with pytest.raises(RucherError):
            await guests.remove(record.vmid)
        await guests.clear_lock(record.vmid, GuestLock.BACKUP)
        with pytest.raises(RucherError) as both:
            await guests.update(record.vmid, changes={"memory": "2"}, delete=["memory"])
        assert both.value.details == {"field": "delete"}
        await guests.update(record.vmid, delete=["memory"])
        assert (await guests.get(record.vmid)).config == {}
        await guests.remove(record.vmid)
        with pytest.raises(RucherError) as gone:
            await guests.get(record.vmid)
        assert gone.value.code is ErrorCode.NOT_FOUND
        assert await guests.next_id() == record.vmid


async def test_ownership_moves_atomically_and_stale_tokens_are_refused(nats_server):
    async with connected(nats_server.url) as bus:
        guests = GuestRegistry(bus)
        record = await guests.register(guest_type=GuestType.QEMU, node="n1", config={}, lock=None)
        moved = await guests.transfer(record.vmid, from_node="n1", to_node="n2", token=40)
        assert (moved.node, moved.owner_token) == ("n2", 40)
        with pytest.raises(RucherError) as wrong_source:
            await guests.transfer(record.vmid, from_node="n1", to_node="n3", token=41)
        assert wrong_source.value.code is ErrorCode.CONFLICT
        with pytest.raises(RucherError) as stale:
            await guests.transfer(record.vmid, from_node="n2", to_node="n3", token=39)
        assert stale.value.code is ErrorCode.STALE_TOKEN
        assert (await guests.get(record.vmid)).node == "n2"
        # Two concurrent recoveries of one guest: exactly one moves it.
        results = await asyncio.gather(
            guests.transfer(record.vmid, from_node="n2", to_node="n1", token=50),
            guests.transfer(record.vmid, from_node="n2", to_node="n3", token=50),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
