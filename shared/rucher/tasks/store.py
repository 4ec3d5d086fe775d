"""Task state in the ``tasks`` bucket and task logs in the TASKLOG stream."""

from __future__ import annotations

import builtins
import time

import msgspec

from rucher.bus import KV, Bus, RucherError
from rucher.bus.client import read_stream
from rucher.bus.codec import decode
from rucher.proto.errors import ErrorCode, ErrorReply
from rucher.proto.keys import encode_token, make_key
from rucher.proto.streams import TASKLOG, TASKS
from rucher.proto.task import TASK_LOG, TaskLogLine, TaskState, TaskStatus
from rucher.tasks.upid import Upid

# Proxmox's exit status for a task stopped through the API.
INTERRUPTED = "interrupted by signal"


def task_key(upid: str) -> str:
    """The ``tasks`` key of a UPID: ``{node}.{upid token}``, so each node's tasks share a prefix."""
    return make_key(Upid.parse(upid).node, upid)


class TaskStore:
    """Read and write task state and logs; every write of state is a compare-and-set."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.kv: KV[TaskState] = KV(bus, TASKS, TaskState)

    async def create(self, state: TaskState) -> None:
        """Record a new running task; raises ``exists`` if the UPID is taken."""
        await self.kv.create(task_key(state.upid), state)

    async def get(self, upid: str) -> TaskState:
        """The state of a task; ``not_found`` when unknown, ``invalid`` when not a UPID."""
        try:
            key = task_key(upid)
        except ValueError as err:
            raise RucherError(ErrorCode.INVALID, str(err), details={"field": "upid"}) from err
        entry = await self.kv.get(key)
        if entry is None or entry.value is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"no such task {upid}")
        return entry.value

    async def list(self, node: str | None = None) -> builtins.list[TaskState]:
        """All tasks, or one node's, newest first."""
        pattern = f"{encode_token(node)}.>" if node else ">"
        states = [entry.value for entry in await self.kv.entries(pattern) if entry.value]
        return sorted(states, key=lambda state: (state.starttime, state.pstart), reverse=True)

    async def finish(
        self, upid: str, exitstatus: str, error: ErrorReply | None = None
    ) -> TaskState | None:
        """Mark a running task stopped; returns the new state, or None if it had already ended."""
        key = task_key(upid)
        while True:
            entry = await self.kv.get(key)
            if entry is None or entry.value is None:
                raise RucherError(ErrorCode.NOT_FOUND, f"no such task {upid}")
            if entry.value.status is TaskStatus.STOPPED:
                return None
            state = _replace(
                entry.value,
                status=TaskStatus.STOPPED,
                exitstatus=exitstatus,
                endtime=time.time(),
                error=error,
            )
            try:
                await self.kv.update(key, state, revision=entry.revision)
            except RucherError as err:
                if err.code is ErrorCode.CONFLICT:
                    continue
                raise
            return state

    async def request_cancel(self, upid: str, user: str) -> TaskState:
        """Ask the task's worker to stop it (Proxmox ``DELETE .../tasks/{upid}``)."""
        key = task_key(upid)
        while True:
            entry = await self.kv.get(key)
            if entry is None or entry.value is None:
                raise RucherError(ErrorCode.NOT_FOUND, f"no such task {upid}")
            if entry.value.status is TaskStatus.STOPPED or entry.value.cancel_requested_by:
                return entry.value
            state = _replace(entry.value, cancel_requested_by=user)
            try:
                await self.kv.update(key, state, revision=entry.revision)
            except RucherError as err:
                if err.code is ErrorCode.CONFLICT:
                    continue
                raise
            return state

    async def append_log(self, upid: str, line: TaskLogLine) -> None:
        """Store one log line (idempotent per line number)."""
        parsed = Upid.parse(upid)
        subject = TASK_LOG.to(node=parsed.node, upid=upid)
        await self.bus.publish(subject, line, msg_id=f"{upid}#{line.n}")

    async def read_log(
        self, upid: str, start: int = 0, limit: int = 50
    ) -> builtins.list[TaskLogLine]:
        """Log lines ``start`` .. ``start + limit - 1`` (0-based, as Proxmox's ``start``)."""
        parsed = Upid.parse(upid)
        subject = TASK_LOG.to(node=parsed.node, upid=upid).subject
        lines: list[TaskLogLine] = []
        seq = 0
        while len(lines) < start + limit:
            msg = await read_stream(
                self.bus.js_read, TASKLOG.name, subject=subject, seq=seq + 1, next_=True
            )
            if msg is None:
                break
            seq = msg.seq or seq + 1
            lines.append(decode(msg.data or b"", TaskLogLine))
        return lines[start : start + limit]


def _replace(state: TaskState, **changes: object) -> TaskState:
    return msgspec.structs.replace(state, **changes)
