"""The optional external fence hook: a configured command (an IPMI power-off) run with a timeout.

Where hardware can be switched off from outside, the manager may run this command against a
node it has to fence instead of (or before) waiting for the node's lease to expire. ``{node}``
in any argument is replaced by the node's name (without it, the name is appended). Only an exit
status of 0 within the timeout counts as fenced; a command that hangs is killed with its process
group and counts as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

import structlog

from rucher.ha.config import FenceHookSettings

log = structlog.get_logger("rucher.ha.fence")

OUTPUT_TAIL = 2000


@dataclass(frozen=True)
class FenceResult:
    """What the hook did: whether it fenced, its exit status (None: timed out), its output."""

    fenced: bool
    exit_status: int | None
    output: str

    @property
    def reason(self) -> str:
        """A readable line for the log and the ``FenceFailed`` event."""
        if self.fenced:
            return "fence hook succeeded"
        if self.exit_status is None:
            return "fence hook timed out"
        return f"fence hook exited with status {self.exit_status}: {self.output.strip()[-200:]}"


def hook_argv(settings: FenceHookSettings, node: str) -> list[str]:
    """The command line for ``node``."""
    argv = [part.replace("{node}", node) for part in settings.command]
    if not any("{node}" in part for part in settings.command):
        argv.append(node)
    return argv


async def run_fence_hook(settings: FenceHookSettings, node: str) -> FenceResult | None:
    """Run the hook against ``node``; None when no hook is configured."""
    if not settings.command:
        return None
    argv = hook_argv(settings, node)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as err:
        log.warning("fence_hook_not_started", node=node, error=str(err))
        return FenceResult(fenced=False, exit_status=127, output=str(err))
    try:
        async with asyncio.timeout(settings.timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        result = FenceResult(fenced=False, exit_status=None, output="")
    else:
        status = process.returncode
        result = FenceResult(
            fenced=status == 0,
            exit_status=status,
            output=output.decode(errors="replace")[-OUTPUT_TAIL:],
        )
    log.info("fence_hook_ran", node=node, fenced=result.fenced, exit_status=result.exit_status)
    return result
