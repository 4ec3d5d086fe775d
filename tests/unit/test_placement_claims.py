"""The scheduler service's claims against an in-memory store: CAS, expiry, confirm, groups."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from rucher.bus import RucherError
from rucher.claims import guest_reservation
from rucher.placement import ClusterView
from rucher.proto.errors import ErrorCode
from rucher.proto.scheduler import (
    AffinityKind,
    Claim,
    ClaimConfirm,
    ClaimEnd,
    ClaimRelease,
    NodeAllocations,
    PlaceGroup,
    PlaceGuest,
    PlanRebalance,
    ResourceAffinity,
    SuggestMigration,
)
from rucher.scheduler.config import SchedulerSettings
from rucher.scheduler.service import SchedulerService
from rucher.service import Settings, SettingsError

from .test_placement_view import GIB, capacity, spec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """The claim store's contract in memory; every write yields, so writers interleave."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.revision = 0
        self.documents: dict[str, tuple[NodeAllocations, int]] = {}
        self.records: dict[str, tuple[Claim, float, int]] = {}
        self.conflicts = 0

    def _next(self) -> int:
        self.revision += 1
        return self.revision

    async def read(self, node):
        await asyncio.sleep(0)
        found = self.documents.get(node)
        return (found[0], found[1]) if found else (None, 0)

    async def write(self, node, document, revision):
        await asyncio.sleep(0)
        current = self.documents.get(node, (None, 0))[1]
        if current != revision:
            self.conflicts += 1
            raise RucherError(ErrorCode.CONFLICT, "changed meanwhile")
        self.documents[node] = (document, self._next())
        return self.documents[node][1]

    async def open_claim(self, claim, ttl):
        await asyncio.sleep(0)
        token = self._next()
        self.records[claim.claim_id] = (claim, self.clock() + ttl, token)
        return token

    async def close_claim(self, claim_id):
        self.records.pop(claim_id, None)

    async def find_claim(self, claim_id):
        found = self.records.get(claim_id)
        return found[0] if found and found[1] > self.clock() else None


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, str | None]] = []

    def claim_created(self, claim):
        self.log.append(("created", claim.vmid, None))

    def claim_confirmed(self, claim):
        self.log.append(("confirmed", claim.vmid, None))

    def claim_ended(self, claim, outcome):
        self.log.append(("ended", claim.vmid, outcome.value))


def settings(**environ: str) -> SchedulerSettings:
    return SchedulerSettings.from_env(Settings.from_env("scheduler", {}), environ)


def scheduler(store: MemoryStore, clock: Clock, *nodes: str, memory: int = 16 * GIB):
    view = ClusterView(cpu_overcommit=2.0)
    for node in nodes:
        view.set_capacity(capacity(node, cpus=8, memory=memory))
        view.set_online(node, True)
    events = Events()
    service = SchedulerService(view, store, events, settings(), scheduler="s1", clock=clock)
    for node, (document, revision) in store.documents.items():
        service.observe_allocations(node, document, revision)
    return service, events


def command(vmid: int, memory: int = 4 * GIB, ttl: float = 30.0, **options) -> PlaceGuest:
    return PlaceGuest(
        command_id=f"c{vmid}", spec=spec(vmid, memory=memory, **options), claim_ttl=ttl
    )


def held(store: MemoryStore, node: str, now: float) -> int:
    document = store.documents.get(node, (None, 0))[0]
    if document is None:
        return 0
    return sum(c.resources.memory for c in document.claims if c.confirmed or c.expires > now)


async def test_a_placement_is_a_claim_in_the_nodes_document_with_a_growing_token():
    clock = Clock()
    store = MemoryStore(clock)
    service, events = scheduler(store, clock, "a", "b")
    first = await service.place_guest(command(101))
    second = await service.place_guest(command(102))
    placement = first.placement
    document, _ = store.documents[placement.node]
    [claim] = [c for c in document.claims if c.vmid == 101]
    assert claim.token == placement.claim_token and claim.expires == clock.now + 30
    assert second.placement.claim_token > placement.claim_token
    assert placement.claim_id in store.records
    assert first.filters and first.filters[0].filter == "online"
    assert events.log == [("created", 101, None), ("created", 102, None)]
    assert service.view.locations[101] == service.view.index[placement.node]


async def test_refusals_carry_the_explanation_and_impossible_requests_are_invalid():
    clock = Clock()
    service, _ = scheduler(MemoryStore(clock), clock, "a")
    with pytest.raises(RucherError) as impossible:
        await service.place_guest(command(101, memory=64 * GIB))
    assert impossible.value.code is ErrorCode.INVALID
    assert impossible.value.details["field"] == "memory"
    await service.place_guest(command(102, memory=12 * GIB))
    with pytest.raises(RucherError) as full:
        await service.place_guest(command(103, memory=8 * GIB))
    assert full.value.code is ErrorCode.UNAVAILABLE and not full.value.retryable
    assert full.value.details["filters"][-1]["filter"] == "resources"
    assert "resources removed 1" in full.value.message


async def test_two_schedulers_with_their_own_views_never_overcommit_a_node():
    clock = Clock()
    store = MemoryStore(clock)
    nodes = ("a", "b", "c")
    first, _ = scheduler(store, clock, *nodes)
    second, _ = scheduler(store, clock, *nodes)

    async def feed(source: SchedulerService, target: SchedulerService) -> None:
        # What the watch of the allocations bucket does: deliver every write, a little late.
        seen: dict[str, int] = {}
        while True:
            for node, (document, revision) in list(store.documents.items()):
                if seen.get(node) != revision:
                    seen[node] = revision
                    target.observe_allocations(node, document, revision)
            await asyncio.sleep(0.001)

    watchers = [asyncio.create_task(feed(first, second)), asyncio.create_task(feed(second, first))]

    async def attempt(service: SchedulerService, vmid: int) -> ErrorCode | None:
        try:
            await service.place_guest(command(vmid, memory=3 * GIB))
        except RucherError as err:
            return err.code
        return None

    results = await asyncio.gather(
        *(attempt(first if vmid % 2 else second, vmid) for vmid in range(100, 140))
    )
    for watcher in watchers:
        watcher.cancel()
    assert results.count(None) == 15  # 5 guests of 3 GiB per 16 GiB node, 3 nodes
    assert set(results) == {None, ErrorCode.UNAVAILABLE}
    assert store.conflicts > 0  # they did collide, and the loser decided again
    for node in nodes:
        assert held(store, node, clock.now) <= 16 * GIB


async def test_an_unconfirmed_claim_stops_counting_at_its_expiry_and_is_swept():
    clock = Clock()
    store = MemoryStore(clock)
    service, events = scheduler(store, clock, "a")
    await service.place_guest(command(101, memory=12 * GIB, ttl=10))
    with pytest.raises(RucherError):
        await service.place_guest(command(102, memory=12 * GIB))
    clock.now += 10.5
    service.refresh_expired()
    placed = await service.place_guest(command(103, memory=12 * GIB))  # the room is free again
    assert placed.placement.node == "a"
    assert [c.vmid for c in store.documents["a"][0].claims] == [103]  # pruned on write
    clock.now += 100
    await service.expire("a")
    assert store.documents["a"][0].claims == ()
    assert ("ended", 103, ClaimEnd.EXPIRED.value) in events.log


async def test_a_confirmed_claim_is_usage_and_never_expires():
    clock = Clock()
    store = MemoryStore(clock)
    service, events = scheduler(store, clock, "a")
    placed = (await service.place_guest(command(101, ttl=5))).placement
    confirm = ClaimConfirm(
        command_id="x",
        claim_id=placed.claim_id,
        claim_token=placed.claim_token,
        node=placed.node,
        vmid=101,
    )
    await service.confirm(confirm)
    await service.confirm(confirm)  # a repeated confirmation changes nothing
    assert events.log.count(("confirmed", 101, None)) == 1
    assert placed.claim_id not in store.records
    clock.now += 1000
    await service.expire("a")
    service.refresh_expired()
    assert held(store, "a", clock.now) == 4 * GIB
    assert service.view.mem_free[0] == 12 * GIB


async def test_confirming_a_stale_token_or_an_expired_claim_is_refused():
    clock = Clock()
    store = MemoryStore(clock)
    service, _ = scheduler(store, clock, "a")
    placed = (await service.place_guest(command(101, ttl=5))).placement
    stale = ClaimConfirm(
        command_id="x",
        claim_id=placed.claim_id,
        claim_token=placed.claim_token - 1,
        node="a",
        vmid=101,
    )
    with pytest.raises(RucherError) as refused:
        await service.confirm(stale)
    assert refused.value.code is ErrorCode.STALE_TOKEN
    clock.now += 6
    late = msgspec.structs.replace(stale, claim_token=placed.claim_token)
    with pytest.raises(RucherError) as expired:
        await service.confirm(late)
    assert expired.value.code is ErrorCode.NOT_FOUND


async def test_a_confirmation_reaching_another_scheduler_reads_the_store():
    clock = Clock()
    store = MemoryStore(clock)
    first, _ = scheduler(store, clock, "a")
    placed = (await first.place_guest(command(101))).placement
    other, _ = scheduler(MemoryStore(clock), clock, "a")
    other.claims.store = store  # same store, but this instance has not seen the document yet
    await other.confirm(
        ClaimConfirm(
            command_id="x",
            claim_id=placed.claim_id,
            claim_token=placed.claim_token,
            node="a",
            vmid=101,
        )
    )
    assert store.documents["a"][0].claims[0].confirmed


async def test_release_gives_the_room_back_and_releasing_twice_is_harmless():
    clock = Clock()
    store = MemoryStore(clock)
    service, events = scheduler(store, clock, "a")
    placed = (await service.place_guest(command(101, memory=12 * GIB))).placement
    await service.release(ClaimRelease(command_id="r", claim_id=placed.claim_id))
    await service.release(ClaimRelease(command_id="r", claim_id=placed.claim_id))
    assert store.documents["a"][0].claims == ()
    assert events.log.count(("ended", 101, "released")) == 1
    await service.place_guest(command(102, memory=12 * GIB))


async def test_a_release_by_guest_ends_every_claim_of_that_guest_on_the_node_only():
    clock = Clock()
    store = MemoryStore(clock)
    service, events = scheduler(store, clock, "a", "b")
    first = (await service.place_guest(command(101, memory=6 * GIB))).placement
    other = (await service.place_guest(command(102, memory=6 * GIB))).placement
    # A fresh instance that never saw the documents still finds the guest's claims.
    fresh, fresh_events = scheduler(store, clock, "a", "b")
    await fresh.release(ClaimRelease(command_id="r", claim_id="", node=first.node, vmid=101))
    remaining = {c.vmid for doc, _ in store.documents.values() for c in doc.claims}
    assert remaining == {102}
    assert fresh_events.log == [("ended", 101, "released")]
    assert first.claim_id not in store.records and other.claim_id in store.records
    # Without a node there is nothing to look up: nothing happens.
    await fresh.release(ClaimRelease(command_id="r2", claim_id="", vmid=102))
    assert {c.vmid for doc, _ in store.documents.values() for c in doc.claims} == {102}
    assert events.log.count(("ended", 101, "released")) == 0


async def test_a_group_is_claimed_whole_or_not_at_all():
    clock = Clock()
    store = MemoryStore(clock)
    service, _ = scheduler(store, clock, "a", "b")
    group = PlaceGroup(
        command_id="g",
        specs=(spec(101, memory=10 * GIB), spec(102, memory=10 * GIB), spec(103, memory=10 * GIB)),
    )
    with pytest.raises(RucherError):
        await service.place_group(group)
    assert all(not doc.claims for doc, _ in store.documents.values())
    together = ResourceAffinity(affinity=AffinityKind.POSITIVE, vmids=(102,))
    placed = await service.place_group(
        PlaceGroup(
            command_id="h",
            specs=(
                spec(101, memory=6 * GIB, resource_affinity=(together,)),
                spec(102, memory=6 * GIB),
            ),
        )
    )
    nodes = {p.node for p in placed.placements}
    assert len(nodes) == 1 and len(store.documents[nodes.pop()][0].claims) == 2


async def test_a_group_losing_a_race_on_its_second_node_rolls_back_its_first():
    clock = Clock()
    store = MemoryStore(clock)
    service, _ = scheduler(store, clock, "a", "b")
    rival, _ = scheduler(store, clock, "a", "b")
    original = store.write

    async def write(node, document, revision):
        if node == "b" and not getattr(write, "raced", False):
            write.raced = True  # type: ignore[attr-defined]
            await rival.place_guest(command(900, memory=10 * GIB, candidates=("b",)))
        return await original(node, document, revision)

    store.write = write  # type: ignore[method-assign]
    apart = ResourceAffinity(affinity=AffinityKind.NEGATIVE, vmids=(101, 102))
    group = PlaceGroup(
        command_id="g",
        specs=(
            spec(101, memory=8 * GIB, resource_affinity=(apart,)),
            spec(102, memory=8 * GIB, resource_affinity=(apart,)),
        ),
    )
    with pytest.raises(RucherError) as refused:
        await service.place_group(group)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert [c.vmid for c in store.documents["a"][0].claims] == []
    assert [c.vmid for c in store.documents["b"][0].claims] == [900]


async def test_migration_targets_and_rebalance_plans_answer_from_the_view():
    clock = Clock()
    store = MemoryStore(clock)
    service, _ = scheduler(store, clock, "a", "b")
    await service.place_guest(command(101, candidates=("a",)))
    await service.place_guest(command(102, candidates=("a",)))
    moved = await service.suggest_migration(
        SuggestMigration(command_id="m", spec=spec(101, memory=4 * GIB), source="a")
    )
    assert moved.placement.node == "b"
    plan = await service.plan_rebalance(PlanRebalance(max_moves=2))
    assert plan.imbalance_after <= plan.imbalance_before


async def test_a_guest_that_moved_or_was_destroyed_ends_its_confirmed_claim():
    clock = Clock()
    store = MemoryStore(clock)
    service, events = scheduler(store, clock, "a", "b")
    placed = (await service.place_guest(command(101, candidates=("a",)))).placement
    await service.confirm(
        ClaimConfirm(
            command_id="c",
            claim_id=placed.claim_id,
            claim_token=placed.claim_token,
            node="a",
            vmid=101,
        )
    )
    await service.guest_moved(101, "a")
    assert store.documents["a"][0].claims
    await service.guest_moved(101, "b")
    assert store.documents["a"][0].claims == ()
    assert ("ended", 101, "superseded") in events.log


def test_guests_created_outside_the_scheduler_hold_their_configured_room():
    guest = guest_reservation(
        101, spec().guest_type, {"memory": "2048", "cores": "2", "sockets": "2"}
    )
    assert guest.resources.memory == 2 * GIB and guest.resources.vcpus == 4
    bare = guest_reservation(102, spec().guest_type, {"memory": "lots"})
    assert bare.resources.memory == 512 << 20 and bare.resources.vcpus == 1


def test_settings_read_the_environment_and_name_the_variable_at_fault():
    chosen = settings(
        RUCHER_SCHEDULER_STRATEGY="pack",
        RUCHER_SCHEDULER_CRS="static",
        RUCHER_SCHEDULER_CPU_OVERCOMMIT="4",
        RUCHER_SCHEDULER_AGENTS="compute",
    )
    assert chosen.policy.strategy.value == "pack" and chosen.policy.crs is not None
    assert chosen.cpu_overcommit == 4.0 and chosen.agents == frozenset({"compute"})
    with pytest.raises(SettingsError, match="RUCHER_SCHEDULER_CRS"):
        settings(RUCHER_SCHEDULER_CRS="fancy")
    with pytest.raises(SettingsError, match="RUCHER_SCHEDULER_WINDOW"):
        settings(RUCHER_SCHEDULER_WINDOW="x")
