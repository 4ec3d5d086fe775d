"""Undo steps for host changes made in several steps: all of them roll back unless committed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

import structlog

from rucher.bus import RucherError

log = structlog.get_logger("rucher.storage.revert")

Undo = Callable[[], Awaitable[None]]


class Revert:
    """Collect undo steps; leaving the block by an exception runs them, newest first.

    ``async with Revert() as revert: ...; revert.add(undo); ...`` — an operation that completes
    keeps what it made; one that fails midway removes it again (Incus ``shared/revert``). A
    failing undo step is logged and the others still run; the original error propagates.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, Undo]] = []

    def add(self, what: str, undo: Undo) -> None:
        """Register how to undo the step just done."""
        self._steps.append((what, undo))

    async def __aenter__(self) -> Revert:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self._steps.clear()
            return
        await self.rollback()

    async def rollback(self) -> None:
        """Run every registered undo step, newest first."""
        while self._steps:
            what, undo = self._steps.pop()
            try:
                await undo()
            except (RucherError, OSError) as err:
                log.warning("undo_step_failed", step=what, error=repr(err))
            else:
                log.info("undo_step_done", step=what)
