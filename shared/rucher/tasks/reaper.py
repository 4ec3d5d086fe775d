"""End tasks whose worker died: the guarantee that every accepted task reaches an end state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import structlog

from rucher.bus import Bus, Operation, RucherError
from rucher.leases import Election
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskState, TaskStatus
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
    Workers register before they accept tasks, and a worker is judged gone by a direct read of
    its registration, never by a watch that may lag.
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
        # Watches keep the running tasks and live registrations in memory, so a sweep costs
        # one read per suspect task instead of a scan of every task ever run.
        running: dict[str, TaskState] = {}
        alive: set[str] = set()
        wake = asyncio.Event()
        async with self.registry.kv.watch() as registrations, self.store.kv.watch() as tasks:

            async def follow_registrations() -> None:
                async for entry in registrations:
                    if entry is None:
                        continue
                    if entry.operation is Operation.PUT:
                        alive.add(entry.key)
                    else:
                        alive.discard(entry.key)
                        wake.set()

            async def follow_tasks() -> None:
                async for entry in tasks:
                    if entry is None:
                        wake.set()
                    elif entry.value is not None and entry.value.status is TaskStatus.RUNNING:
                        running[entry.key] = entry.value
                    else:
                        running.pop(entry.key, None)

            followers = [
                asyncio.create_task(follow_registrations()),
                asyncio.create_task(follow_tasks()),
            ]
            try:
                while self.election.is_leader:
                    suspects = [s for s in running.values() if s.worker not in alive]
                    try:
                        await self.sweep(suspects)
                    except RucherError as err:
                        log.warning("task_sweep_failed", error=err.message)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.interval):
                            await wake.wait()
                    wake.clear()
            finally:
                for follower in followers:
                    follower.cancel()

    async def sweep(self, candidates: Iterable[TaskState] | None = None) -> list[str]:
        """End every running task (of ``candidates``, else all) whose worker is gone.

        A worker counts as gone only when a direct read of its registration finds nothing, so
        a registration that the watch has not delivered yet never gets its tasks reaped.
        """
        if candidates is None:
            candidates = await self.store.list()
        reaped = []
        for state in candidates:
            if state.status is not TaskStatus.RUNNING:
                continue
            if await self.registry.kv.get(state.worker) is not None:
                continue
            reason = worker_died(state.worker)
            error = RucherError(ErrorCode.UNAVAILABLE, reason, retryable=False).to_reply()
            if await self.store.finish(state.upid, reason, error) is not None:
                log.warning("task_reaped", task=state.upid, worker=state.worker)
                reaped.append(state.upid)
        return reaped
