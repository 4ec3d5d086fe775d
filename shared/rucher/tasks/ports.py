"""What a service's logic needs of tasks, as Protocols: a body's view of its task, a submitter.

``rucher.tasks.TaskRunner`` and its ``TaskContext`` fit them; services type their logic against
these so it runs in unit tests with stand-ins, and every service shares the one definition.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class TaskLog(Protocol):
    """A running task as its body sees it: its UPID and its log."""

    upid: str

    async def log(self, text: str) -> None:
        """Append one line to the task log."""
        ...


TaskBody = Callable[[TaskLog], Awaitable[None]]


class TaskSubmitter(Protocol):
    """Runs bodies as Proxmox tasks (``rucher.tasks.TaskRunner``)."""

    async def submit(
        self,
        *,
        task_type: str,
        task_id: str,
        user: str,
        body: TaskBody,
        command_id: str | None = None,
    ) -> str:
        """Start ``body`` and return the task's UPID at once."""
        ...
