"""A real service process for tests: serves one RPC that starts a long task.

Run as ``python -m tests.integration.worker_service``; the tests kill it to show that a task
whose worker died still reaches an end state, and stop it to show a clean drain.
"""

from __future__ import annotations

import asyncio
import time

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.proto.base import Command, Kind, RpcSubject, Scope
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskAccepted
from rucher.service import ServiceContext, main
from rucher.tasks import TaskContext


class StartSleep(Command, frozen=True, kw_only=True, tag="testworker.start_sleep"):
    """Start a task that logs and sleeps for ``seconds``."""

    seconds: float
    user: str


START_SLEEP = RpcSubject(
    "rpc.testworker.start_sleep.{node}",
    StartSleep,
    Kind.RPC,
    Scope.NODE,
    "Start a sleeping task on {node}.",
    reply=TaskAccepted,
)


async def request_sleep(bus: Bus, node: str, seconds: float) -> TaskAccepted:
    """Ask the worker on ``node`` for a sleeping task, waiting while it is still starting."""
    command = StartSleep(command_id=new_id(), seconds=seconds, user="root@pam")
    deadline = time.monotonic() + 30
    while True:
        try:
            return await bus.request(START_SLEEP.to(node=node), command)
        except RucherError as err:
            if err.code is not ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def setup(context: ServiceContext) -> None:
    """Serve START_SLEEP for this node."""

    async def start_sleep(command: StartSleep, headers: dict[str, str]) -> TaskAccepted:
        async def body(task: TaskContext) -> None:
            await task.log(f"sleeping {command.seconds} s")
            await asyncio.sleep(command.seconds)
            await task.log("awake")

        upid = await context.tasks.submit(
            task_type="testsleep",
            task_id="1",
            user=command.user,
            body=body,
            command_id=command.command_id,
        )
        return TaskAccepted(upid=upid)

    await context.bus.serve(START_SLEEP, start_sleep, node=context.settings.node)


if __name__ == "__main__":
    main("testworker", setup)
