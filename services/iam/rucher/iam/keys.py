"""The ticket signing keys: created once, rotated daily by the IAM leader, previous one kept."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from rucher.bus import RucherError
from rucher.iam.context import Table
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import TICKET_KEYS_KEY, TicketKeys
from rucher.pve.ticket import new_signing_key

log = structlog.get_logger("rucher.iam.keys")


async def ensure_keys(table: Table[TicketKeys]) -> TicketKeys:
    """The current keys, creating the first ones if there are none yet."""
    while True:
        entry = await table.get(TICKET_KEYS_KEY)
        if entry is not None and entry.value is not None:
            return entry.value
        keys = TicketKeys(current=new_signing_key(time.time()))
        try:
            await table.create(TICKET_KEYS_KEY, keys)
        except RucherError as err:
            if err.code is not ErrorCode.EXISTS:
                raise
            continue
        log.info("ticket_keys_created", key=keys.current.id)
        return keys


async def rotate_if_due(table: Table[TicketKeys], every: float, now: float | None = None) -> bool:
    """Rotate once the current key is ``every`` seconds old (compare-and-set); True if rotated."""
    moment = time.time() if now is None else now
    entry = await table.get(TICKET_KEYS_KEY)
    if entry is None or entry.value is None:
        await ensure_keys(table)
        return False
    if moment - entry.value.current.created < every:
        return False
    rotated = TicketKeys(current=new_signing_key(moment), previous=entry.value.current)
    try:
        await table.update(TICKET_KEYS_KEY, rotated, revision=entry.revision)
    except RucherError as err:
        if err.code is ErrorCode.CONFLICT:
            return False  # someone else rotated meanwhile
        raise
    log.info("ticket_keys_rotated", key=rotated.current.id, previous=entry.value.current.id)
    return True


class KeyRotator:
    """Runs while this instance leads: rotates the keys whenever they are due."""

    def __init__(self, table: Table[TicketKeys], every: float, check: float = 60.0) -> None:
        self.table = table
        self.every = every
        self.check = min(check, every / 4)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin rotating (called when elected)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop rotating (called when demoted)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await rotate_if_due(self.table, self.every)
            except RucherError as err:
                log.warning("ticket_key_rotation_failed", error=err.message)
            await asyncio.sleep(self.check)
