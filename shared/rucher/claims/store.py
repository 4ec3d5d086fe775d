"""Where claims live and what is said about them: the cluster's KV buckets and claim events.

``allocations`` holds one document per node, written only by compare-and-set; ``claims`` holds
each unconfirmed claim under its id with the claim's TTL, so its expiry is observed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import structlog

from rucher.bus import KV, Bus, RucherError
from rucher.bus.client import new_id
from rucher.proto.errors import ErrorCode
from rucher.proto.keys import encode_token
from rucher.proto.scheduler import (
    CLAIM_CONFIRMED,
    CLAIM_CREATED,
    CLAIM_ENDED,
    Claim,
    ClaimConfirmed,
    ClaimCreated,
    ClaimEnd,
    ClaimEnded,
    NodeAllocations,
)
from rucher.proto.streams import ALLOCATIONS, CLAIMS

log = structlog.get_logger("rucher.claims")


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


class KvClaimStore:
    """Claims in JetStream KV: ``allocations`` by compare-and-set, ``claims`` with a TTL each."""

    def __init__(self, bus: Bus) -> None:
        self.allocations: KV[NodeAllocations] = KV(bus, ALLOCATIONS, NodeAllocations)
        self.claims: KV[Claim] = KV(bus, CLAIMS, Claim)

    async def read(self, node: str) -> tuple[NodeAllocations | None, int]:
        """A node's allocations document and its revision (0 when it has none yet)."""
        entry = await self.allocations.get(encode_token(node))
        return (entry.value, entry.revision) if entry is not None else (None, 0)

    async def write(self, node: str, document: NodeAllocations, revision: int) -> int:
        """Replace the document only if it is still at ``revision``; raises ``conflict``."""
        key = encode_token(node)
        if revision == 0:
            try:
                return await self.allocations.create(key, document)
            except RucherError as err:
                if err.code is ErrorCode.EXISTS:
                    raise RucherError(ErrorCode.CONFLICT, f"allocations of {node} exist") from err
                raise
        return await self.allocations.update(key, document, revision=revision)

    async def open_claim(self, claim: Claim, ttl: float) -> int:
        """Record a new claim that expires after ``ttl`` unless confirmed; returns its token."""
        return await self.claims.create(claim.claim_id, claim, ttl=ttl)

    async def close_claim(self, claim_id: str) -> None:
        """Remove a claim's record (confirmed, released or abandoned); absent is fine."""
        with contextlib.suppress(RucherError):
            await self.claims.delete(claim_id)

    async def find_claim(self, claim_id: str) -> Claim | None:
        """The record of a claim still pending."""
        entry = await self.claims.get(claim_id)
        return entry.value if entry is not None else None


class BusEvents:
    """Claim events on ``evt.scheduler.*.{node}``, published without holding up the decision."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._pending: set[asyncio.Task[None]] = set()

    def _send(self, publishing: Coroutine[Any, Any, int]) -> None:
        async def send() -> None:
            try:
                await publishing
            except RucherError as err:
                log.warning("claim_event_lost", error=err.message)

        task = asyncio.get_running_loop().create_task(send())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (a while) for the events still being published, before the bus closes."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=timeout)

    def claim_created(self, claim: Claim) -> None:
        """A claim was committed."""
        event = ClaimCreated(event_id=new_id(), node=self.bus.node, time=time.time(), claim=claim)
        self._send(self.bus.publish(CLAIM_CREATED.to(node=self.bus.node), event))

    def claim_confirmed(self, claim: Claim) -> None:
        """An agent confirmed a claim."""
        event = ClaimConfirmed(
            event_id=new_id(),
            node=self.bus.node,
            time=time.time(),
            claim_id=claim.claim_id,
            target=claim.node,
            vmid=claim.vmid,
        )
        self._send(self.bus.publish(CLAIM_CONFIRMED.to(node=self.bus.node), event))

    def claim_ended(self, claim: Claim, outcome: ClaimEnd) -> None:
        """A claim stopped holding resources."""
        event = ClaimEnded(
            event_id=new_id(),
            node=self.bus.node,
            time=time.time(),
            claim_id=claim.claim_id,
            target=claim.node,
            vmid=claim.vmid,
            outcome=outcome,
            held=max(0.0, time.time() - claim.created),
        )
        self._send(self.bus.publish(CLAIM_ENDED.to(node=self.bus.node), event))
