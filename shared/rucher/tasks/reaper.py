"""End tasks whose worker died: the guarantee that every accepted task reaches an end state."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from rucher.bus import Bus, Operation, RucherError
from rucher.leases import Election
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskStatus
from rucher.registry import ServiceRegistry
from rucher.tasks.store import TaskStore

log = structlog.get_logger("rucher.tasks.reaper")

SWEEP_INTERVAL = 5.0


def worker_died(worker: str) -> str:
    """The exit status of a task whose worker vanished (Proxmox says "unexpected status")."""
    return f"unexpected status: worker {worker} stopped before the task ended"


class TaskReaper:
    """Runs in every service process; only the elected one sweeps.

    The leader ends every running task whose worker has no registration: at election, when a
    registration expires or is removed (watched), and every ``interval`` s as a backstop.
    Tasks are read before registrations, so a task is never reaped for a worker that registered
    after the read (workers register before they accept tasks).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        candidate: str,
        interval: float = SWEEP_INTERVAL,
        ttl: float = 10.0,
    ) -> None:
        self.bus = bus
        self.store = TaskStore(bus)
        self.registry = ServiceRegistry(bus)
        self.interval = interval
        self.election = Election(
            bus,
            "task-reaper",
            candidate=candidate,
            ttl=ttl,
            on_elected=self._on_elected,
            on_demoted=self._on_demoted,
        )
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Campaign for the reaper role."""
        self.election.start()

    async def stop(self) -> None:
        """Stop sweeping and give up the role."""
        await self._on_demoted()
        await self.election.stop()

    async def _on_elected(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def _on_demoted(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    async def _run(self) -> None:
        async with self.registry.kv.watch() as updates:
            wake = asyncio.Event()

            async def listen() -> None:
                async for entry in updates:
                    if entry is not None and entry.operation is not Operation.PUT:
                        wake.set()

            listener = asyncio.create_task(listen())
            try:
                while self.election.is_leader:
                    try:
                        await self.sweep()
                    except RucherError as err:
                        log.warning("task_sweep_failed", error=err.message)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.interval):
                            await wake.wait()
                    wake.clear()
            finally:
                listener.cancel()

    async def sweep(self) -> list[str]:
        """End every running task whose worker is gone; returns their UPIDs."""
        running = [state for state in await self.store.list() if state.status is TaskStatus.RUNNING]
        if not running:
            return []
        alive = await self.registry.alive_keys()
        reaped = []
        for state in running:
            if state.worker in alive:
                continue
            reason = worker_died(state.worker)
            error = RucherError(ErrorCode.UNAVAILABLE, reason, retryable=False).to_reply()
            if await self.store.finish(state.upid, reason, error) is not None:
                log.warning("task_reaped", task=state.upid, worker=state.worker)
                reaped.append(state.upid)
        return reaped
