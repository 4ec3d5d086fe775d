"""Claim expiry and usage reconciliation, done by one elected scheduler instance.

Every instance stops counting a pending claim the moment its time runs out; the leader also
removes it from the node's allocations document (when its record's TTL fires, and in a
periodic sweep that catches claims whose scheduler died before writing the record), and ends
confirmed claims of guests that were destroyed or now run on another node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

import structlog

from rucher.bus import KV, Bus, Operation, RucherError
from rucher.leases import Election
from rucher.proto.scheduler import Claim
from rucher.proto.streams import CLAIMS
from rucher.scheduler.service import SchedulerService

log = structlog.get_logger("rucher.scheduler.reaper")

ELECTION = "scheduler-claims"


class ClaimReaper:
    """Leader-only work on claims; every instance campaigns, one leads."""

    def __init__(
        self,
        bus: Bus,
        service: SchedulerService,
        *,
        candidate: str,
        ttl: float,
        sweep: float,
        owners: Callable[[], Mapping[int, str]] = dict,
    ) -> None:
        self.bus = bus
        self.service = service
        self.sweep = sweep
        self.owners = owners
        self.election = Election(
            bus,
            ELECTION,
            candidate=candidate,
            ttl=ttl,
            on_elected=self._lead,
            on_demoted=self._stop,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._moves: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    def start(self) -> None:
        """Campaign for leadership."""
        self.election.start()

    async def stop(self) -> None:
        """Stop leading and campaigning."""
        await self.election.stop()
        await self._stop()

    def guest_moved(self, vmid: int, owner: str | None) -> None:
        """A guest changed node or was destroyed (the leader ends its claims elsewhere)."""
        if self.election.is_leader:
            self._moves.put_nowait((vmid, owner))

    async def _lead(self) -> None:
        log.info("claim_reaper_leading")
        # Guests that moved while nobody led: their confirmed claims elsewhere end now.
        owners = self.owners()
        for ledger in self.service.ledger.nodes.values():
            for claim in ledger.document.claims if ledger.document else ():
                owner = owners.get(claim.vmid)
                if claim.confirmed and owner is not None and owner != claim.node:
                    self._moves.put_nowait((claim.vmid, owner))
        self._tasks = [
            asyncio.create_task(self._sweep(), name="reaper-sweep"),
            asyncio.create_task(self._watch_records(), name="reaper-records"),
            asyncio.create_task(self._reconcile(), name="reaper-guests"),
        ]

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _sweep(self) -> None:
        service = self.service
        while True:
            await asyncio.sleep(self.sweep)
            deadline = service.clock()
            for node in service.ledger.expiring(deadline, service.settings.claim_grace):
                try:
                    await service.expire(node)
                except RucherError as err:
                    log.warning("claim_sweep_failed", node=node, error=err.message)

    async def _watch_records(self) -> None:
        records: KV[Claim] = KV(self.bus, CLAIMS, Claim)
        async with records.watch() as updates:
            async for entry in updates:
                if entry is None or entry.operation is not Operation.EXPIRED:
                    continue
                node = self.service.ledger.claim_nodes.get(entry.key)
                if node is None:
                    continue
                try:
                    await self.service.expire(node, frozenset({entry.key}))
                except RucherError as err:
                    log.warning("claim_expiry_failed", claim=entry.key, error=err.message)

    async def _reconcile(self) -> None:
        while True:
            vmid, owner = await self._moves.get()
            try:
                await self.service.guest_moved(vmid, owner)
            except RucherError as err:
                log.warning("claim_reconcile_failed", vmid=vmid, error=err.message)
