"""The scheduler's domain logic: decide in memory, then commit claims by compare-and-set.

Depends only on small protocols (a claim store, an event sink, a clock), never on NATS, so it
is tested against an in-memory store as well as the real one. Every write of a node's
allocations document is compare-and-set on the revision the decision was validated against, so
two schedulers can never both fill the same room: the loser re-reads and decides again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import msgspec
import structlog

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.placement import (
    ClusterView,
    Decision,
    PlacementError,
    place,
    place_group,
    rebalance_plan,
    suggest_migration,
)
from rucher.proto.common import Done
from rucher.proto.errors import ErrorCode
from rucher.proto.scheduler import (
    Claim,
    ClaimConfirm,
    ClaimEnd,
    ClaimRelease,
    GroupDecision,
    NodeAllocations,
    PlaceGroup,
    PlaceGuest,
    Placement,
    PlacementDecision,
    PlacementSpec,
    PlanRebalance,
    RebalancePlan,
    SuggestMigration,
)
from rucher.scheduler.config import SchedulerSettings
from rucher.scheduler.ledger import Ledger, active, reservation

log = structlog.get_logger("rucher.scheduler")


class ClaimStore(Protocol):
    """Where claims live: per-node allocations (compare-and-set) and per-claim records."""

    async def read(self, node: str) -> tuple[NodeAllocations | None, int]:
        """A node's allocations document and its revision (0 when it has none)."""

    async def write(self, node: str, document: NodeAllocations, revision: int) -> int:
        """Replace the document if still at ``revision``; raises ``conflict`` otherwise."""

    async def open_claim(self, claim: Claim, ttl: float) -> int:
        """Record a claim expiring after ``ttl`` s; returns its token (a growing revision)."""

    async def close_claim(self, claim_id: str) -> None:
        """Remove a claim's record; absent is fine."""

    async def find_claim(self, claim_id: str) -> Claim | None:
        """The record of a claim still pending."""


class ClaimEvents(Protocol):
    """Where claim events go."""

    def claim_created(self, claim: Claim) -> None:
        """A claim was committed."""

    def claim_confirmed(self, claim: Claim) -> None:
        """An agent confirmed a claim."""

    def claim_ended(self, claim: Claim, outcome: ClaimEnd) -> None:
        """A claim stopped holding resources."""


def refusal(error: PlacementError) -> RucherError:
    """A placement refusal as the error the caller gets (its message is the task's error)."""
    return RucherError(
        ErrorCode.INVALID if error.impossible else ErrorCode.UNAVAILABLE,
        error.message,
        retryable=False,
        details=error.details(),
    )


class SchedulerService:
    """Place guests, claim their resources atomically, confirm, release and expire claims."""

    def __init__(
        self,
        view: ClusterView,
        store: ClaimStore,
        events: ClaimEvents,
        settings: SchedulerSettings,
        *,
        scheduler: str,
        clock: Callable[[], float],
    ) -> None:
        self.view = view
        self.store = store
        self.events = events
        self.settings = settings
        self.scheduler = scheduler
        self.clock = clock
        self.ledger = Ledger(view, clock)

    # Requests -----------------------------------------------------------------------------

    async def place_guest(self, command: PlaceGuest) -> PlacementDecision:
        """Choose a node for one guest and claim its resources there."""
        policy = command.policy or self.settings.policy
        options = self.settings.options
        [(placement, decision)] = await self._claim(
            [command.spec], lambda: [place(self.view, command.spec, policy, options)], command
        )
        return PlacementDecision(placement=placement, filters=decision.outcomes)

    async def place_group(self, command: PlaceGroup) -> GroupDecision:
        """Place every guest of the group under its own claim, or none of them."""
        policy = command.policy or self.settings.policy
        options = self.settings.options
        placed = await self._claim(
            command.specs, lambda: place_group(self.view, command.specs, policy, options), command
        )
        return GroupDecision(placements=tuple(placement for placement, _ in placed))

    async def suggest_migration(self, command: SuggestMigration) -> PlacementDecision:
        """Choose and claim a migration target away from the guest's current node."""
        policy = command.policy or self.settings.policy
        options = self.settings.options

        def decide() -> list[Decision]:
            return [suggest_migration(self.view, command.spec, command.source, policy, options)]

        [(placement, decision)] = await self._claim([command.spec], decide, command)
        return PlacementDecision(placement=placement, filters=decision.outcomes)

    async def plan_rebalance(self, query: PlanRebalance) -> RebalancePlan:
        """Moves that lower the imbalance; nothing is claimed."""
        plan = rebalance_plan(
            self.view,
            query.max_moves,
            query.nodes,
            query.policy or self.settings.policy,
            self.settings.options,
        )
        return RebalancePlan(
            moves=plan.moves,
            imbalance_before=plan.imbalance_before,
            imbalance_after=plan.imbalance_after,
        )

    async def confirm(self, command: ClaimConfirm) -> Done:
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

        changed = await self._update(command.node, change, fresh_if_missing=True)
        await self.store.close_claim(command.claim_id)
        if changed and confirmed is not None:
            log.info(
                "claim_confirmed", claim=command.claim_id, vmid=command.vmid, node=command.node
            )
            self.events.claim_confirmed(confirmed)
        return Done()

    async def release(self, command: ClaimRelease) -> None:
        """Give a claim's resources back; releasing a claim that is gone does nothing."""
        node = command.node or self.ledger.claim_nodes.get(command.claim_id)
        if node is None:
            record = await self.store.find_claim(command.claim_id)
            node = record.node if record is not None else None
        if node is not None:
            for claim in await self._remove(node, lambda c: c.claim_id == command.claim_id):
                log.info("claim_released", claim=claim.claim_id, vmid=claim.vmid, node=node)
                self.events.claim_ended(claim, ClaimEnd.RELEASED)
        await self.store.close_claim(command.claim_id)

    async def expire(self, node: str, claim_ids: frozenset[str] = frozenset()) -> None:
        """Drop the node's unconfirmed claims that ran out (or whose records expired)."""
        deadline = self.clock() - self.settings.claim_grace

        def expired(claim: Claim) -> bool:
            return not claim.confirmed and (
                claim.expires <= deadline or claim.claim_id in claim_ids
            )

        for claim in await self._remove(node, expired):
            log.info("claim_expired", claim=claim.claim_id, vmid=claim.vmid, node=node)
            self.events.claim_ended(claim, ClaimEnd.EXPIRED)
            await self.store.close_claim(claim.claim_id)

    async def guest_moved(self, vmid: int, owner: str | None) -> None:
        """A guest now lives on ``owner`` (None: destroyed): its claims elsewhere end."""
        for node, ledger in list(self.ledger.nodes.items()):
            if node == owner or ledger.document is None:
                continue
            if any(c.vmid == vmid and c.confirmed for c in ledger.document.claims):
                for claim in await self._remove(node, lambda c: c.vmid == vmid and c.confirmed):
                    log.info("claim_superseded", claim=claim.claim_id, vmid=vmid, node=node)
                    self.events.claim_ended(claim, ClaimEnd.SUPERSEDED)

    # Claiming -----------------------------------------------------------------------------

    async def _claim(
        self,
        specs: Sequence[PlacementSpec],
        decide: Callable[[], list[Decision]],
        command: PlaceGuest | PlaceGroup | SuggestMigration,
    ) -> list[tuple[Placement, Decision]]:
        for attempt in range(self.settings.attempts):
            try:
                decisions = decide()
            except PlacementError as err:
                log.info("placement_refused", vmids=[s.vmid for s in specs], reason=err.message)
                raise refusal(err) from err
            now = self.clock()
            claims = [
                Claim(
                    claim_id=new_id(),
                    node=decision.node,
                    vmid=spec.vmid,
                    guest_type=spec.guest_type,
                    resources=spec.resources,
                    token=0,
                    created=now,
                    expires=now + command.claim_ttl,
                    scheduler=self.scheduler,
                    node_affinity=spec.node_affinity,
                    resource_affinity=spec.resource_affinity,
                )
                for spec, decision in zip(specs, decisions, strict=True)
            ]
            async with self._holding(claims):
                written = await self._write(claims, command.claim_ttl)
            if written is not None:
                for claim in written:
                    self.events.claim_created(claim)
                log.debug("claimed", vmids=[c.vmid for c in written], attempt=attempt)
                return [
                    (
                        Placement(
                            vmid=claim.vmid,
                            node=claim.node,
                            claim_id=claim.claim_id,
                            claim_token=claim.token,
                            expires=claim.expires,
                            score=decision.score,
                        ),
                        decision,
                    )
                    for claim, decision in zip(written, decisions, strict=True)
                ]
        raise RucherError(
            ErrorCode.UNAVAILABLE,
            f"could not claim for {', '.join(str(s.vmid) for s in specs)} after "
            f"{self.settings.attempts} attempts: other schedulers took the room meanwhile",
            retryable=True,
        )

    @contextlib.asynccontextmanager
    async def _holding(self, claims: list[Claim]) -> AsyncIterator[None]:
        """Count the claims in this process's view while they are being written."""
        for claim in claims:
            self.ledger.hold(claim.node, reservation(claim))
        try:
            yield
        finally:
            for claim in claims:
                self.ledger.unhold(claim.node, claim.claim_id)

    async def _write(self, claims: list[Claim], ttl: float) -> list[Claim] | None:
        """Record and commit the claims, all or none; None when they must be decided again."""
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
                    await self._remove(written, lambda c, ids=ids: c.claim_id in ids)  # type: ignore[misc]
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

    # Document changes ---------------------------------------------------------------------

    async def _update(
        self,
        node: str,
        change: Callable[[NodeAllocations], NodeAllocations | None],
        *,
        fresh_if_missing: bool = False,
    ) -> bool:
        """Apply ``change`` to a node's document by compare-and-set; False if nothing changed."""
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

    async def _remove(self, node: str, doomed: Callable[[Claim], bool]) -> list[Claim]:
        """Drop the claims ``doomed`` picks from a node's document; returns those dropped."""
        removed: list[Claim] = []

        def change(document: NodeAllocations) -> NodeAllocations | None:
            removed[:] = [c for c in document.claims if doomed(c)]
            if not removed:
                return None
            kept = tuple(c for c in document.claims if not doomed(c))
            return NodeAllocations(node=node, claims=kept, updated=self.clock())

        await self._update(node, change)
        return removed

    # Observations -------------------------------------------------------------------------

    def observe_allocations(
        self, node: str, document: NodeAllocations | None, revision: int
    ) -> None:
        """A node's allocations document changed in the store (any scheduler wrote it)."""
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
