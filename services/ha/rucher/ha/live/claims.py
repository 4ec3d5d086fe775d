"""The HA manager's claims: a recovered guest's CPUs and memory reserved on its new node.

The manager chooses a recovery node with the shared CRS scores, then commits a claim for the
guest there through the shared :class:`~rucher.claims.ClaimBook`, by the same compare-and-set on
the node's ``allocations`` document as the scheduler: a node whose room went (to the scheduler,
or to another guest recovered in the same round) refuses the claim and the manager tries the
next node. The view is built per decision from the node's published capacity, its allocations
document and the guests the registry places there without a claim. The guest's claims on the
fenced node end (superseded) so its old room stops counting. The target's LRM starts the guest
with the claim and confirms it once the start succeeded, or releases it when the start failed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

import structlog

from rucher.bus.client import new_id
from rucher.claims import ClaimBook, ClaimEvents, ClaimStore, Target, guest_reservation
from rucher.ha.env import NoRoomError
from rucher.placement import ClusterView
from rucher.proto.cluster import NodeCapacity
from rucher.proto.guest import GuestRecord
from rucher.proto.scheduler import Claim, ClaimConfirm, ClaimRelease, PlacementSpec

log = structlog.get_logger("rucher.ha.live.claims")

PLACER = "ha"
# How long a recovery claim holds its room before the target's LRM started the guest.
CLAIM_TTL = 120.0
# Attempts on a node whose document changed between the read and the write (another placer).
ATTEMPTS = 3


class HaClaims:
    """Commit, confirm and release the HA manager's claims (see the module's docstring)."""

    def __init__(
        self,
        store: ClaimStore,
        events: ClaimEvents,
        *,
        cpu_overcommit: float = 2.0,
        ttl: float = CLAIM_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.events = events
        self.cpu_overcommit = cpu_overcommit
        self.ttl = ttl
        self.clock = clock

    def _book(self) -> ClaimBook:
        """A claim book over a fresh view: every decision reads the node's document anew."""
        view = ClusterView(cpu_overcommit=self.cpu_overcommit)
        return ClaimBook(view, self.store, self.events, placer=PLACER, clock=self.clock)

    async def claim(
        self,
        record: GuestRecord,
        node: str,
        capacity: NodeCapacity | None,
        guests: Mapping[int, GuestRecord],
        fenced: str | None = None,
    ) -> Claim:
        """Reserve ``record``'s CPUs and memory on ``node``; :class:`NoRoomError` when it is full.

        A pending or confirmed claim of the guest on ``node`` already (an earlier attempt whose
        answer was lost) is kept and returned. ``guests``: the registry's guests, those on
        ``node`` without a claim count as held there.
        """
        if capacity is None:
            raise NoRoomError(f"node '{node}' published no capacity")
        for _ in range(ATTEMPTS - 1):
            with contextlib.suppress(NoRoomError):
                return await self._claim(record, node, capacity, guests, fenced)
        return await self._claim(record, node, capacity, guests, fenced)

    async def _claim(
        self,
        record: GuestRecord,
        node: str,
        capacity: NodeCapacity,
        guests: Mapping[int, GuestRecord],
        fenced: str | None,
    ) -> Claim:
        """One attempt on the node's document as read now (a write conflict refuses it)."""
        book = self._book()
        book.view.set_capacity(capacity)
        book.view.set_online(node, True)
        book.observe_allocations(node, *await self.store.read(node))
        document = book.ledger.node(node).document
        now = self.clock()
        for existing in document.claims if document is not None else ():
            if existing.vmid == record.vmid and (existing.confirmed or existing.expires > now):
                return existing
        for vmid, guest in guests.items():
            if guest.node == node and vmid != record.vmid:
                book.ledger.set_guest(node, guest_reservation(vmid, guest.type, guest.config), vmid)
        wanted = guest_reservation(record.vmid, record.type, record.config)
        spec = PlacementSpec(vmid=record.vmid, guest_type=record.type, resources=wanted.resources)
        drafted = book.draft([Target(spec, node)], self.ttl)
        written = await book.commit(drafted, self.ttl)
        if written is None:
            raise NoRoomError(f"node '{node}' has no room for VM {record.vmid}")
        [claim] = written
        log.info("ha_claim_committed", vmid=record.vmid, node=node, claim=claim.claim_id)
        if fenced is not None and fenced != node:
            await self.supersede(record.vmid, fenced, book)
        return claim

    async def supersede(self, vmid: int, fenced: str, book: ClaimBook | None = None) -> None:
        """End the guest's claims on the fenced node: its room there stops counting."""
        book = book or self._book()
        book.observe_allocations(fenced, *await self.store.read(fenced))
        for old in await book.remove(fenced, lambda c: c.vmid == vmid):
            log.info("ha_claim_superseded", vmid=vmid, node=fenced, claim=old.claim_id)

    async def pending(self, node: str, vmid: int) -> Claim | None:
        """The guest's unexpired, unconfirmed claim on ``node`` (the one to start it under)."""
        document, _ = await self.store.read(node)
        now = self.clock()
        for claim in document.claims if document is not None else ():
            if claim.vmid == vmid and not claim.confirmed and claim.expires > now:
                return claim
        return None

    async def confirm(self, claim: Claim) -> None:
        """The guest runs on the claim's node: its room stays held without expiry."""
        command = ClaimConfirm(
            command_id=new_id(),
            claim_id=claim.claim_id,
            claim_token=claim.token,
            node=claim.node,
            vmid=claim.vmid,
        )
        book = self._book()
        book.observe_allocations(claim.node, *await self.store.read(claim.node))
        await book.confirm(command)

    async def release(self, claim: Claim, reason: str) -> None:
        """Give the claim's room back (the start failed)."""
        command = ClaimRelease(
            command_id=new_id(),
            claim_id=claim.claim_id,
            reason=reason,
            node=claim.node,
            vmid=claim.vmid,
        )
        book = self._book()
        book.observe_allocations(claim.node, *await self.store.read(claim.node))
        await book.release(command)
