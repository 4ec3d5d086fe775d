"""The scheduler's domain logic: decide in memory, then commit claims by compare-and-set.

Depends only on small protocols (a claim store, an event sink, a clock), never on NATS, so it
is tested against an in-memory store as well as the real one. Claims are committed through the
shared :class:`rucher.claims.ClaimBook` (the HA manager commits through the same code): every
write of a node's allocations document is compare-and-set on the revision the decision was
validated against, so two schedulers can never both fill the same room; the loser re-reads and
decides again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from rucher.bus import RucherError
from rucher.claims import ClaimBook, ClaimEvents, ClaimStore, Target
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
    ClaimConfirm,
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

log = structlog.get_logger("rucher.scheduler")


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
        self.settings = settings
        self.scheduler = scheduler
        self.clock = clock
        self.claims = ClaimBook(
            view, store, events, placer=scheduler, clock=clock, grace=settings.claim_grace
        )
        self.ledger = self.claims.ledger

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
        await self.claims.confirm(command)
        return Done()

    async def release(self, command: ClaimRelease) -> None:
        """Give a claim's resources back (or every claim of a destroyed guest on its node)."""
        await self.claims.release(command)

    async def expire(self, node: str, claim_ids: frozenset[str] = frozenset()) -> None:
        """Drop the node's unconfirmed claims that ran out (or whose records expired)."""
        await self.claims.expire(node, claim_ids)

    async def guest_moved(self, vmid: int, owner: str | None) -> None:
        """A guest now lives on ``owner`` (None: destroyed): its claims elsewhere end."""
        await self.claims.guest_moved(vmid, owner)

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
            targets = [
                Target(spec, decision.node) for spec, decision in zip(specs, decisions, strict=True)
            ]
            written = await self.claims.commit(
                self.claims.draft(targets, command.claim_ttl), command.claim_ttl
            )
            if written is not None:
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

    # Observations -------------------------------------------------------------------------

    def observe_allocations(
        self, node: str, document: NodeAllocations | None, revision: int
    ) -> None:
        """A node's allocations document changed in the store (any placer wrote it)."""
        self.claims.observe_allocations(node, document, revision)

    def refresh_expired(self) -> None:
        """Re-derive nodes whose pending claims ran out, so the view stops counting them."""
        self.claims.refresh_expired()
