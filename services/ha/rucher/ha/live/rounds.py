"""The CRM and LRM round loops: one round in a worker thread, then wait for a change or a tick.

Proxmox runs a round every 10 s; here a round runs as soon as something it reads changed (an
LRM result for the manager, a new manager state for an LRM, an expired lease) and at least
every ``interval`` (1 s by default), but never more often than every ``min_gap``, so two loops
waking each other cannot spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger("rucher.ha.live.rounds")


class Daemon(Protocol):
    """A CRM or LRM: one iteration per round."""

    state: str

    def iterate(self, cluster_state_ok: bool = True) -> bool:
        """Run one round; False when the daemon exits."""
        ...


class RoundLoop:
    """Runs one daemon's rounds until stopped."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], Daemon],
        *,
        interval: float,
        min_gap: float,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self.factory = factory
        self.interval = interval
        self.min_gap = min_gap
        self.ready = ready
        self.daemon: Daemon | None = None
        self.rounds = 0
        self.last_round = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Run the next round as soon as the minimum gap allows."""
        self._wake.set()

    def start(self) -> None:
        """Start the loop in the background."""
        self._task = asyncio.create_task(self._run(), name=f"ha-{self.name}")

    async def finished(self) -> None:
        """Wait until the daemon exits on its own (a cancelled wait leaves the loop running)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop after the round in progress (the core is not interrupted mid-round)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        self.daemon = await asyncio.to_thread(self.factory)
        while True:
            started = time.monotonic()
            self._wake.clear()
            if self.ready():
                alive = await self._round(self.daemon)
                if not alive:
                    log.info("ha_daemon_exited", daemon=self.name)
                    return
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.min_gap - elapsed))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self.interval - self.min_gap)):
                    await self._wake.wait()

    async def _round(self, daemon: Daemon) -> bool:
        before = daemon.state
        try:
            # Shielded: a cancelled loop lets the thread finish its round rather than leave
            # the core half-way through a state change.
            alive = await asyncio.shield(asyncio.to_thread(daemon.iterate, True))
        except Exception:  # one bad round must not end HA on this node
            log.exception("ha_round_failed", daemon=self.name)
            alive = True
        self.rounds += 1
        self.last_round = time.time()
        if daemon.state != before:
            log.info("ha_daemon_state", daemon=self.name, state=daemon.state, previous=before)
        return alive
