"""The shared claim book as the HA manager uses it: its own view, the scheduler's CAS."""

from __future__ import annotations

import asyncio

import pytest

from rucher.bus import RucherError
from rucher.claims import ClaimBook, Target
from rucher.placement import ClusterView, PlacementError, place
from rucher.proto.errors import ErrorCode
from rucher.proto.scheduler import PlacementPolicy

from .test_placement_claims import GIB, Clock, Events, MemoryStore, command, held, scheduler
from .test_placement_view import capacity, spec


def placer(store: MemoryStore, clock: Clock, *nodes: str) -> ClaimBook:
    """A claim book over a view of its own, as the HA manager builds one."""
    view = ClusterView(cpu_overcommit=2.0)
    for node in nodes:
        view.set_capacity(capacity(node, cpus=8, memory=16 * GIB))
        view.set_online(node, True)
    return ClaimBook(view, store, Events(), placer="ha", clock=clock)


async def recover(book: ClaimBook, vmid: int, memory: int) -> str | None:
    """Place one guest with the shared code and commit its claim; decide again on a conflict."""
    wanted = spec(vmid, memory=memory)
    while True:
        try:
            decision = place(book.view, wanted, PlacementPolicy())
        except PlacementError:
            return None
        claims = book.draft([Target(wanted, decision.node)], ttl=30.0)
        written = await book.commit(claims, ttl=30.0)
        if written is not None:
            return written[0].node


async def test_a_claim_book_commits_a_decision_and_knows_its_token():
    clock = Clock()
    store = MemoryStore(clock)
    book = placer(store, clock, "a")
    assert await recover(book, 201, 4 * GIB) == "a"
    document, _ = store.documents["a"]
    [claim] = document.claims
    assert claim.vmid == 201 and claim.scheduler == "ha" and claim.token > 0
    assert book.view.locations[201] == book.view.index["a"]


async def test_the_ha_manager_and_a_scheduler_never_overcommit_a_node_together():
    clock = Clock()
    store = MemoryStore(clock)
    book = placer(store, clock, "a", "b")
    service, _ = scheduler(store, clock, "a", "b")

    async def by_scheduler(vmid: int) -> str | ErrorCode:
        try:
            return (await service.place_guest(command(vmid, memory=3 * GIB))).placement.node
        except RucherError as err:
            return err.code

    results = await asyncio.gather(
        *(
            recover(book, vmid, 3 * GIB) if vmid % 2 else by_scheduler(vmid)
            for vmid in range(300, 320)
        )
    )
    placed = [node for node in results if isinstance(node, str) and node in {"a", "b"}]
    refused = {code for code in results if isinstance(code, ErrorCode)}
    assert refused <= {ErrorCode.UNAVAILABLE}
    assert len(placed) == 10  # 5 guests of 3 GiB per 16 GiB node, 2 nodes
    assert store.conflicts > 0
    for node in ("a", "b"):
        assert held(store, node, clock.now) <= 16 * GIB


async def test_a_commit_that_lost_the_room_writes_nothing():
    clock = Clock()
    store = MemoryStore(clock)
    book = placer(store, clock, "a")
    rival = placer(store, clock, "a")
    wanted = spec(401, memory=12 * GIB)
    decision = place(book.view, wanted, PlacementPolicy())
    assert await recover(rival, 402, 12 * GIB) == "a"
    claims = book.draft([Target(wanted, decision.node)], ttl=30.0)
    assert await book.commit(claims, ttl=30.0) is None
    assert [c.vmid for c in store.documents["a"][0].claims] == [402]
    assert claims[0].claim_id not in store.records
    with pytest.raises(PlacementError):
        place(book.view, wanted, PlacementPolicy())
