"""Tasks: the asynchronous operations Proxmox answers with a UPID."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from rucher.proto.base import Event, Kind, Reply, Scope, Subject
from rucher.proto.errors import ErrorReply


class TaskStatus(StrEnum):
    """Proxmox's two task states: a task is running until it has stopped, well or not."""

    RUNNING = "running"
    STOPPED = "stopped"


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    """The ``tasks`` bucket's value for one task (key ``{node}.{upid token}``).

    ``exitstatus`` is ``"OK"`` or a readable error, as Proxmox reports it; ``error`` keeps the
    structured form. ``worker`` is the service-registry key of the instance running the task:
    when that registration expires, the task reaper ends the task as failed.
    """

    upid: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str
    worker: str
    status: TaskStatus = TaskStatus.RUNNING
    exitstatus: str | None = None
    endtime: float | None = None
    error: ErrorReply | None = None
    cancel_requested_by: str | None = None
    command_id: str | None = None


class TaskLogLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a task's log, as stored in the TASKLOG stream (``n`` counts from 1)."""

    n: int
    t: str
    time: float


class TaskAccepted(Reply, frozen=True, kw_only=True, tag="task.accepted"):
    """The reply to a command that runs as a task: its UPID, to poll status and log."""

    upid: str


class TaskStarted(Event, frozen=True, kw_only=True, tag="task.started"):
    """A task was accepted and started running on its worker."""

    upid: str
    task_type: str
    id: str
    user: str


class TaskFinished(Event, frozen=True, kw_only=True, tag="task.finished"):
    """A task reached its end state; ``exitstatus`` is ``OK`` or the error text."""

    upid: str
    task_type: str
    id: str
    user: str
    exitstatus: str
    error: ErrorReply | None = None


TASK_STARTED = Subject(
    "evt.task.started.{node}", TaskStarted, Kind.EVENT, Scope.NODE, "A task started on {node}."
)
TASK_FINISHED = Subject(
    "evt.task.finished.{node}", TaskFinished, Kind.EVENT, Scope.NODE, "A task on {node} ended."
)
TASK_LOG = Subject(
    "tasklog.{node}.{upid}",
    TaskLogLine,
    Kind.TASKLOG,
    Scope.NODE,
    "Log lines of one task; {upid} is the UPID encoded as a key token.",
)
