"""Committing claims by compare-and-set, and every later change to them, for any placer.

The scheduler and the HA manager decide with the shared placement code over their own view,
then commit here: each node's allocations document is written only by compare-and-set on the
revision the decision was checked against, so two placers can never both fill the same room;
the loser re-reads and decides again. Confirming, releasing, expiring and superseding a claim go
through the same compare-and-set.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import msgspec
import structlog

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.claims.ledger import Ledger, active, reservation
from rucher.claims.store import ClaimEvents, ClaimStore
from rucher.placement import ClusterView
from rucher.proto.errors import ErrorCode
from rucher.proto.scheduler import (
    Claim,
    ClaimConfirm,
    ClaimEnd,
    ClaimRelease,
    NodeAllocations,
    PlacementSpec,
)

log = structlog.get_logger("rucher.claims")


@dataclass(frozen=True)
class Target:
    """One guest and the node a decision chose for it."""

    spec: PlacementSpec
    node: str


class ClaimBook:
    """Claims of one placer: commit, confirm, release, expire, all by compare-and-set."""

    def __init__(
        self,
        view: ClusterView,
        store: ClaimStore,
        events: ClaimEvents,
        *,
        placer: str,
        clock: Callable[[], float],
        grace: float = 0.0,
    ) -> None:
        self.view = view
        self.store = store
        self.events = events
        self.placer = placer
        self.clock = clock
        self.grace = grace
        self.ledger = Ledger(view, clock)

    # Committing ---------------------------------------------------------------------------

    def draft(self, targets: Sequence[Target], ttl: float) -> list[Claim]:
        """New claims (not yet written) for guests on the nodes chosen for them."""
        now = self.clock()
        return [
            Claim(
                claim_id=new_id(),
                node=target.node,
                vmid=target.spec.vmid,
                guest_type=target.spec.guest_type,
                resources=target.spec.resources,
                token=0,
                created=now,
                expires=now + ttl,
                scheduler=self.placer,
                node_affinity=target.spec.node_affinity,
                resource_affinity=target.spec.resource_affinity,
            )
            for target in targets
        ]

    async def commit(self, claims: list[Claim], ttl: float) -> list[Claim] | None:
        """Write the claims, all or none; None when the room went meanwhile (decide again).

        The claims count in this placer's view while they are written, so a decision taken
        meanwhile does not pick the same room. The written claims carry their tokens.
        """
        async with self._holding(claims):
            written = await self._write(claims, ttl)
        if written is not None:
            for claim in written:
                self.events.claim_created(claim)
        return written

    @contextlib.asynccontextmanager
    async def _holding(self, claims: list[Claim]) -> AsyncIterator[None]:
        for claim in claims:
            self.ledger.hold(claim.node, reservation(claim))
        try:
            yield
        finally:
            for claim in claims:
                self.ledger.unhold(claim.node, claim.claim_id)

    async def _write(self, claims: list[Claim], ttl: float) -> list[Claim] | None:
        tokens = {}
        for claim in claims:
            tokens[claim.claim_id] = await self.store.open_claim(claim, ttl)
        claims = [msgspec.structs.replace(c, token=tokens[c.claim_id]) for c in claims]
        by_node: dict[str, list[Claim]] = {}
        for claim in claims:
            by_node.setdefault(claim.node, []).append(claim)
        done: list[str] = []
        for node in sorted(by_node):
            if not await self._commit(node, by_node[node]):
                for written in done:
                    ids = {c.claim_id for c in by_node[written]}
                    await self.remove(written, lambda c, ids=ids: c.claim_id in ids)  # type: ignore[misc]
                for claim in claims:
                    await self.store.close_claim(claim.claim_id)
                return None
            done.append(node)
        return claims

    async def _commit(self, node: str, claims: list[Claim]) -> bool:
        """Add claims to a node's document if they still fit at its current revision."""
        ledger = self.ledger.node(node)
        async with ledger.lock:
            if not all(self.view.holds(node, claim.claim_id) for claim in claims):
                # Since the decision, another claim took the room: decide again.
                return False
            now = self.clock()
            document = NodeAllocations(
                node=node, claims=(*active(ledger.document, now), *claims), updated=now
            )
            try:
                revision = await self.store.write(node, document, ledger.revision)
            except RucherError as err:
                if err.code is not ErrorCode.CONFLICT:
                    raise
                self.ledger.observe(node, *await self.store.read(node))
                return False
            self.ledger.observe(node, document, revision)
            return True

    # Later changes ------------------------------------------------------------------------

    async def confirm(self, command: ClaimConfirm) -> None:
        """The agent runs the guest: the claim's resources become usage, without expiry."""
        confirmed: Claim | None = None

        def change(document: NodeAllocations) -> NodeAllocations | None:
            nonlocal confirmed
            claim = next((c for c in document.claims if c.claim_id == command.claim_id), None)
            if claim is None or claim.vmid != command.vmid:
                raise RucherError(
                    ErrorCode.NOT_FOUND,
                    f"claim {command.claim_id} for {command.vmid} on {command.node} "
                    "expired or was released",
                )
            if claim.token != command.claim_token:
                raise RucherError(
                    ErrorCode.STALE_TOKEN,
                    f"claim {command.claim_id} has token {claim.token}, not {command.claim_token}",
                )
            confirmed = claim
            if claim.confirmed:
                return None
            if claim.expires <= self.clock():
                raise RucherError(ErrorCode.NOT_FOUND, f"claim {command.claim_id} expired")
            return _replace(document, claim, msgspec.structs.replace(claim, confirmed=True))

        changed = await self.update(command.node, change, fresh_if_missing=True)
        await self.store.close_claim(command.claim_id)
        if changed and confirmed is not None:
            log.info(
                "claim_confirmed", claim=command.claim_id, vmid=command.vmid, node=command.node
            )
            self.events.claim_confirmed(confirmed)

    async def release(self, command: ClaimRelease) -> None:
        """Give a claim's resources back; releasing a claim that is gone does nothing.

        Without a claim id, every claim of ``command.vmid`` on ``command.node`` goes.
        """
        if not command.claim_id:
            if command.vmid is not None and command.node is not None:
                await self._release_guest(command.node, command.vmid)
            return
        node = command.node or self.ledger.claim_nodes.get(command.claim_id)
        if node is None:
            record = await self.store.find_claim(command.claim_id)
            node = record.node if record is not None else None
        if node is not None:
            for claim in await self.remove(node, lambda c: c.claim_id == command.claim_id):
                log.info("claim_released", claim=claim.claim_id, vmid=claim.vmid, node=node)
                self.events.claim_ended(claim, ClaimEnd.RELEASED)
        await self.store.close_claim(command.claim_id)

    async def _release_guest(self, node: str, vmid: int) -> None:
        if self.ledger.node(node).document is None:
            self.ledger.observe(node, *await self.store.read(node))
        for claim in await self.remove(node, lambda c: c.vmid == vmid):
            log.info("claim_released", claim=claim.claim_id, vmid=vmid, node=node)
            self.events.claim_ended(claim, ClaimEnd.RELEASED)
            await self.store.close_claim(claim.claim_id)

    async def expire(self, node: str, claim_ids: frozenset[str] = frozenset()) -> None:
        """Drop the node's unconfirmed claims that ran out (or whose records expired)."""
        deadline = self.clock() - self.grace

        def expired(claim: Claim) -> bool:
            return not claim.confirmed and (
                claim.expires <= deadline or claim.claim_id in claim_ids
            )

        for claim in await self.remove(node, expired):
            log.info("claim_expired", claim=claim.claim_id, vmid=claim.vmid, node=node)
            self.events.claim_ended(claim, ClaimEnd.EXPIRED)
            await self.store.close_claim(claim.claim_id)

    async def guest_moved(self, vmid: int, owner: str | None) -> None:
        """A guest now lives on ``owner`` (None: destroyed): its claims elsewhere end."""
        for node, ledger in list(self.ledger.nodes.items()):
            if node == owner or ledger.document is None:
                continue
            if any(c.vmid == vmid and c.confirmed for c in ledger.document.claims):
                for claim in await self.remove(node, lambda c: c.vmid == vmid and c.confirmed):
                    log.info("claim_superseded", claim=claim.claim_id, vmid=vmid, node=node)
                    self.events.claim_ended(claim, ClaimEnd.SUPERSEDED)

    async def update(
        self,
        node: str,
        change: Callable[[NodeAllocations], NodeAllocations | None],
        *,
        fresh_if_missing: bool = False,
    ) -> bool:
        """Apply ``change`` to a node's document by compare-and-set; False if nothing changed.

        On a conflict the document is read again and ``change`` applied to it; a ``not_found``
        from ``change`` is retried once on a fresh read when ``fresh_if_missing``.
        """
        ledger = self.ledger.node(node)
        async with ledger.lock:
            fresh = False
            while True:
                document = ledger.document or NodeAllocations(node=node)
                try:
                    changed = change(document)
                except RucherError as err:
                    if err.code is not ErrorCode.NOT_FOUND or fresh or not fresh_if_missing:
                        raise
                    self.ledger.observe(node, *await self.store.read(node))
                    fresh = True
                    continue
                if changed is None:
                    return False
                try:
                    revision = await self.store.write(node, changed, ledger.revision)
                except RucherError as err:
                    if err.code is not ErrorCode.CONFLICT:
                        raise
                    self.ledger.observe(node, *await self.store.read(node))
                    fresh = True
                    continue
                self.ledger.observe(node, changed, revision)
                return True

    async def remove(self, node: str, doomed: Callable[[Claim], bool]) -> list[Claim]:
        """Drop the claims ``doomed`` picks from a node's document; returns those dropped."""
        removed: list[Claim] = []

        def change(document: NodeAllocations) -> NodeAllocations | None:
            removed[:] = [c for c in document.claims if doomed(c)]
            if not removed:
                return None
            kept = tuple(c for c in document.claims if not doomed(c))
            return NodeAllocations(node=node, claims=kept, updated=self.clock())

        await self.update(node, change)
        return removed

    # Observations -------------------------------------------------------------------------

    def observe_allocations(
        self, node: str, document: NodeAllocations | None, revision: int
    ) -> None:
        """A node's allocations document changed in the store (any placer wrote it)."""
        self.ledger.observe(node, document, revision)

    def refresh_expired(self) -> None:
        """Re-derive nodes whose pending claims ran out, so the view stops counting them."""
        for node in self.ledger.expiring(self.clock()):
            self.ledger.derive(node)


def _replace(document: NodeAllocations, old: Claim, new: Claim) -> NodeAllocations:
    return NodeAllocations(
        node=document.node,
        claims=tuple(new if c.claim_id == old.claim_id else c for c in document.claims),
        updated=document.updated,
    )
