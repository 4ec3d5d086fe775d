"""Run operations as Proxmox tasks: mint the UPID, record state, log, cancel, always end."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from rucher.bus import KV, Bus, RucherError
from rucher.bus.client import new_id
from rucher.proto.bus import AppliedCommand
from rucher.proto.errors import ErrorCode, ErrorReply
from rucher.proto.keys import encode_token, make_key
from rucher.proto.streams import IDEMPOTENCY
from rucher.proto.task import (
    TASK_FINISHED,
    TASK_STARTED,
    TaskFinished,
    TaskLogLine,
    TaskStarted,
    TaskState,
    TaskStatus,
)
from rucher.tasks.store import INTERRUPTED, TaskStore
from rucher.tasks.upid import Upid, UpidMinter

log = structlog.get_logger("rucher.tasks")

FINISH_RETRY = 0.5


@dataclass
class TaskContext:
    """What a running task's body gets: its UPID and a way to write its log."""

    upid: str
    runner: TaskRunner
    _lines: int = 0

    async def log(self, text: str) -> None:
        """Append one line to the task log (Proxmox shows it in the task viewer)."""
        self._lines += 1
        line = TaskLogLine(n=self._lines, t=text, time=time.time())
        await self.runner.store.append_log(self.upid, line)


TaskBody = Callable[[TaskContext], Awaitable[None]]


class TaskRunner:
    """Executes task bodies for one worker (one service instance on one node).

    Every accepted task ends: ``OK``, the error's message, ``interrupted by signal`` when
    stopped through the API, or, if this process dies, whatever the task reaper writes once the
    worker's registration (``worker``) expires. Finishing is retried until the store takes it.
    """

    def __init__(self, bus: Bus, *, worker: str) -> None:
        self.bus = bus
        self.worker = worker
        self.store = TaskStore(bus)
        self.minter = UpidMinter(bus.node)
        self._applied: KV[AppliedCommand] = KV(bus, IDEMPOTENCY, AppliedCommand)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Watch this node's tasks for stop requests."""
        ready = asyncio.Event()
        self._watcher = asyncio.create_task(self._watch_cancellations(ready))
        await ready.wait()

    async def submit(
        self,
        *,
        task_type: str,
        task_id: str,
        user: str,
        body: TaskBody,
        command_id: str | None = None,
    ) -> str:
        """Start ``body`` as a task and return its UPID at once.

        With ``command_id``, submitting the same command again returns the first UPID and runs
        nothing more.
        """
        applied_key = make_key("task", command_id) if command_id else None
        if applied_key:
            known = await self._applied.get(applied_key)
            if known and known.value:
                return known.value.reply.decode()
        upid = await self._record_new(task_type, task_id, user, command_id)
        if applied_key:
            record = AppliedCommand(applier=self.worker, time=time.time(), reply=upid.encode())
            try:
                await self._applied.create(applied_key, record)
            except RucherError as err:
                if err.code is not ErrorCode.EXISTS:
                    raise
                # A concurrent submit of the same command won: end ours, answer with theirs.
                await self.store.finish(upid, f"duplicate of command {command_id}")
                winner = await self._applied.get(applied_key)
                if winner and winner.value:
                    return winner.value.reply.decode()
        task = asyncio.create_task(self._execute(upid, body), name=upid)
        self._running[upid] = task
        task.add_done_callback(lambda _: self._running.pop(upid, None))
        return upid

    async def _record_new(
        self, task_type: str, task_id: str, user: str, command_id: str | None
    ) -> str:
        while True:
            try:
                upid = self.minter.mint(task_type, task_id, user)
            except ValueError as err:
                raise RucherError(ErrorCode.INVALID, str(err)) from err
            state = TaskState(
                upid=str(upid),
                node=upid.node,
                pid=upid.pid,
                pstart=upid.pstart,
                starttime=upid.starttime,
                type=task_type,
                id=task_id,
                user=user,
                worker=self.worker,
                command_id=command_id,
            )
            try:
                await self.store.create(state)
            except RucherError as err:
                if err.code is ErrorCode.EXISTS:
                    continue
                raise
            await self._emit_started(upid)
            return str(upid)

    async def _emit_started(self, upid: Upid) -> None:
        event = TaskStarted(
            event_id=new_id(),
            node=self.bus.node,
            time=time.time(),
            upid=str(upid),
            task_type=upid.type,
            id=upid.id,
            user=upid.user,
        )
        with contextlib.suppress(RucherError):
            await self.bus.publish(TASK_STARTED.to(node=self.bus.node), event)

    async def _execute(self, upid: str, body: TaskBody) -> None:
        context = TaskContext(upid=upid, runner=self)
        bound = log.bind(task=upid)
        error: ErrorReply | None = None
        try:
            await body(context)
            exitstatus = "OK"
        except asyncio.CancelledError:
            exitstatus = INTERRUPTED
            error = RucherError(ErrorCode.CANCELLED, INTERRUPTED).to_reply()
        except RucherError as err:
            exitstatus, error = err.message, err.to_reply()
        except Exception as err:  # noqa: BLE001 - a task body's crash must still end the task
            bound.exception("task_crashed")
            exitstatus = f"internal error: {err!r}"
            error = RucherError(ErrorCode.INTERNAL, exitstatus).to_reply()
        await self._finish(upid, exitstatus, error)
        bound.info("task_finished", exitstatus=exitstatus)

    async def _finish(self, upid: str, exitstatus: str, error: ErrorReply | None) -> None:
        while True:
            try:
                state = await self.store.finish(upid, exitstatus, error)
                break
            except RucherError as err:
                if not err.retryable:
                    log.exception("task_finish_refused", task=upid, error=err.message)
                    return
                await asyncio.sleep(FINISH_RETRY)
        if state is None:
            return
        event = TaskFinished(
            event_id=new_id(),
            node=self.bus.node,
            time=time.time(),
            upid=upid,
            task_type=state.type,
            id=state.id,
            user=state.user,
            exitstatus=exitstatus,
            error=error,
        )
        with contextlib.suppress(RucherError):
            await self.bus.publish(TASK_FINISHED.to(node=self.bus.node), event)

    async def _watch_cancellations(self, ready: asyncio.Event) -> None:
        pattern = f"{encode_token(self.bus.node)}.>"
        async with self.store.kv.watch(pattern) as updates:
            async for entry in updates:
                if entry is None:
                    ready.set()
                    continue
                state = entry.value
                if (
                    state is not None
                    and state.status is TaskStatus.RUNNING
                    and state.cancel_requested_by
                    and state.upid in self._running
                ):
                    log.info("task_stop_requested", task=state.upid, by=state.cancel_requested_by)
                    self._running[state.upid].cancel()

    @property
    def running(self) -> list[str]:
        """UPIDs of the tasks this runner is executing now."""
        return list(self._running)

    async def close(self, grace: float = 10.0) -> None:
        """Let running tasks finish for ``grace`` s, then stop them; each still gets its end."""
        tasks = list(self._running.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                # Each interrupted task records its end; if NATS is gone that cannot happen,
                # and after another grace period the reaper ends them once this worker's
                # registration expires.
                _, stuck = await asyncio.wait(pending, timeout=grace)
                for task in stuck:
                    task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
