"""The HA manager's recovery claims over the shared claim book's compare-and-set."""

from __future__ import annotations

import asyncio

import pytest

from rucher.ha.env import NoRoomError
from rucher.ha.live.claims import HaClaims
from rucher.proto.guest import GuestRecord, GuestType

from .test_placement_claims import GIB, Clock, Events, MemoryStore, held
from .test_placement_view import capacity


def guest(vmid: int, node: str, memory_mib: int, cores: int = 1) -> GuestRecord:
    """A registry record with the configured CPUs and memory."""
    config = {"memory": str(memory_mib), "cores": str(cores)}
    return GuestRecord(vmid=vmid, type=GuestType.QEMU, node=node, config=config, digest="x")


def claims(store: MemoryStore, clock: Clock) -> HaClaims:
    """The manager's claims over the in-memory store, with the test clock."""
    return HaClaims(store, Events(), clock=clock, ttl=30.0)


async def test_a_recovery_commits_a_claim_for_the_guest_on_its_new_node():
    clock = Clock()
    store = MemoryStore(clock)
    made = await claims(store, clock).claim(
        guest(101, "dead", 4096, cores=2), "b", capacity("b", cpus=8, memory=16 * GIB), {}
    )
    [claim] = store.documents["b"][0].claims
    assert claim == made and claim.scheduler == "ha" and claim.token > 0
    assert claim.resources.memory == 4 * GIB and claim.resources.vcpus == 2
    assert not claim.confirmed


async def test_a_node_without_room_refuses_and_keeps_its_document():
    clock = Clock()
    store = MemoryStore(clock)
    ha = claims(store, clock)
    # Two guests run there already without a claim: 12 of 16 GiB are taken.
    others = {201: guest(201, "b", 6144), 202: guest(202, "b", 6144)}
    with pytest.raises(NoRoomError):
        await ha.claim(guest(101, "dead", 8192), "b", capacity("b", memory=16 * GIB), others)
    assert "b" not in store.documents
    assert not store.records


async def test_two_recoveries_at_once_never_overcommit_a_node_that_fits_one():
    clock = Clock()
    store = MemoryStore(clock)
    node = capacity("b", memory=16 * GIB)
    first, second = claims(store, clock), claims(store, clock)
    results = await asyncio.gather(
        first.claim(guest(101, "dead", 10240), "b", node, {}),
        second.claim(guest(102, "dead", 10240), "b", node, {}),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, NoRoomError)]
    assert len(refused) == 1
    assert len(store.documents["b"][0].claims) == 1
    assert held(store, "b", clock.now) <= 16 * GIB


async def test_the_guest_stops_counting_on_the_fenced_node():
    clock = Clock()
    store = MemoryStore(clock)
    ha = claims(store, clock)
    old = await ha.claim(guest(101, "a", 4096), "a", capacity("a"), {})
    await ha.confirm(old)
    assert store.documents["a"][0].claims[0].confirmed
    await ha.claim(guest(101, "a", 4096), "b", capacity("b"), {}, fenced="a")
    assert store.documents["a"][0].claims == ()
    assert [c.vmid for c in store.documents["b"][0].claims] == [101]


async def test_a_lost_answer_keeps_the_claim_already_committed():
    clock = Clock()
    store = MemoryStore(clock)
    ha = claims(store, clock)
    made = await ha.claim(guest(101, "dead", 4096), "b", capacity("b"), {})
    again = await ha.claim(guest(101, "dead", 4096), "b", capacity("b"), {})
    assert again.claim_id == made.claim_id
    assert len(store.documents["b"][0].claims) == 1


async def test_the_target_starts_under_its_pending_claim_then_confirms_or_releases_it():
    clock = Clock()
    store = MemoryStore(clock)
    ha = claims(store, clock)
    made = await ha.claim(guest(101, "dead", 4096), "b", capacity("b"), {})
    assert await ha.pending("b", 101) == made
    assert await ha.pending("c", 101) is None
    await ha.confirm(made)
    assert store.documents["b"][0].claims[0].confirmed
    assert await ha.pending("b", 101) is None
    failed = await ha.claim(guest(102, "dead", 4096), "b", capacity("b"), {})
    await ha.release(failed, "start failed")
    assert [c.vmid for c in store.documents["b"][0].claims] == [101]


async def test_an_unconfirmed_claim_stops_holding_once_it_expired():
    clock = Clock()
    store = MemoryStore(clock)
    ha = claims(store, clock)
    node = capacity("b", memory=16 * GIB)
    await ha.claim(guest(101, "dead", 10240), "b", node, {})
    with pytest.raises(NoRoomError):
        await ha.claim(guest(102, "dead", 10240), "b", node, {})
    clock.now += 31.0
    assert await ha.pending("b", 101) is None
    await ha.claim(guest(102, "dead", 10240), "b", node, {})
