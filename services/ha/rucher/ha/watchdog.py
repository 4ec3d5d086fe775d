"""The node's HA watchdog: hold the node lease, and kill the HA guests before it can expire.

The node lease (``ha-node:{node}``, in the node's own ``ha-node-{node}`` bucket) says "this node
may run HA guests"; its fencing token is the epoch every HA start on this node carries. The
watchdog renews it every ``renew_interval``. Every ``tick`` it compares the monotonic clock with
the kill deadline, the time the last successful renewal was *sent* plus
``lease_ttl - kill_margin``: once past it, it kills the node's HA guests itself, through libvirt
and then ``/proc`` (:mod:`rucher.ha.killer`), without the bus. A guard process
(:mod:`rucher.ha.guard`) holds the same deadline and kills the guests if this process dies or
hangs. Timing argument: ``services/ha/README.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from enum import StrEnum
from typing import Protocol

import structlog

from rucher import qemuproc
from rucher.bus import RucherError
from rucher.ha.config import WatchdogSettings
from rucher.ha.guard import encode_arm
from rucher.ha.killer import local_ha_processes
from rucher.proto.errors import ErrorCode

log = structlog.get_logger("rucher.ha.watchdog")

RETRY_INTERVAL = 0.25
Killer = Callable[[frozenset[int]], Awaitable[tuple[list[int], bool]]]
Probe = Callable[[frozenset[int]], Awaitable[bool]]
FencedCallback = Callable[[list[int], int, float], Coroutine[None, None, None]]


async def ha_guests_present(vmids: frozenset[int]) -> bool:
    """Whether a QEMU process of one of ``vmids`` runs in this node's network namespace."""
    netns = qemuproc.own_netns()
    return bool(await asyncio.to_thread(local_ha_processes, vmids, netns))


class NodeLease(Protocol):
    """What the watchdog needs of ``rucher.leases.Lease``."""

    token: int | None
    deadline: float

    async def try_acquire(self) -> bool:
        """Take the lease if free."""
        ...

    async def renew(self) -> None:
        """Extend it by one TTL, counted from when the write was sent."""
        ...

    async def release(self) -> None:
        """Give it up."""
        ...


class WatchdogState(StrEnum):
    """Where the watchdog stands."""

    WAITING = "waiting"  # no lease yet: no HA guest may run here
    ARMED = "armed"  # lease held: HA guests may run until the kill deadline
    FENCED = "fenced"  # the deadline passed: the HA guests were killed


class GuardLink:
    """The guard child process: started on demand, restarted if it dies, fed ``arm`` lines."""

    def __init__(self, settings: WatchdogSettings) -> None:
        self.settings = settings
        self._process: asyncio.subprocess.Process | None = None

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            if self._process is not None:
                log.warning("guard_restarted", exit_status=self._process.returncode)
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rucher.ha.guard",
                "--tick",
                str(self.settings.tick / 2),
                "--hw-device",
                str(self.settings.watchdog_device),
                "--hw-timeout",
                str(self.settings.hw_timeout),
                stdin=asyncio.subprocess.PIPE,
            )
        return self._process

    async def arm(self, kill_at: float, expiry: float, vmids: frozenset[int]) -> None:
        """Tell the guard the current deadlines and HA guests."""
        process = await self._ensure()
        assert process.stdin is not None
        try:
            process.stdin.write(encode_arm(kill_at, expiry, vmids))
            # A guard that stopped reading (hung) must not stall the watchdog: replace it.
            async with asyncio.timeout(self.settings.tick):
                await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.warning("guard_unreachable")
        except TimeoutError:
            log.warning("guard_hung", pid=process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            replacement = await self._ensure()
            assert replacement.stdin is not None
            replacement.stdin.write(encode_arm(kill_at, expiry, vmids))

    async def close(self, *, disarm: bool) -> None:
        """Stop the guard: disarmed it exits quietly, otherwise it kills what it guards."""
        process, self._process = self._process, None
        if process is None or process.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if disarm:
                process.stdin.write(b"disarm\n")
                await process.stdin.drain()
            process.stdin.close()
        await process.wait()

    @property
    def pid(self) -> int | None:
        """The guard's pid while it runs."""
        return self._process.pid if self._process and self._process.returncode is None else None


class NodeWatchdog:
    """Renew the node lease; past the kill deadline, kill the node's HA guests."""

    def __init__(
        self,
        lease: NodeLease,
        ha_vmids: Callable[[], frozenset[int]],
        killer: Killer,
        settings: WatchdogSettings,
        *,
        guard: GuardLink | None = None,
        on_fenced: FencedCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        present: Probe = ha_guests_present,
    ) -> None:
        self.lease = lease
        self.ha_vmids = ha_vmids
        self.killer = killer
        self.settings = settings
        self.guard = guard
        self.on_fenced = on_fenced
        self.clock = clock
        self.present = present
        self.state = WatchdogState.WAITING
        self._dropping: asyncio.Task[None] | None = None
        self.fenced_token: int | None = None
        self._held_token: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._killing = asyncio.Lock()

    @property
    def epoch(self) -> int | None:
        """The fencing token HA starts on this node carry, while the lease is held."""
        return self.lease.token if self.state is WatchdogState.ARMED else None

    def kill_at(self) -> float:
        """The monotonic time at which the HA guests are killed unless renewed before."""
        return self.lease.deadline - self.settings.kill_margin

    async def start(self) -> None:
        """Kill leftover HA guests (no lease yet), then run the renewer and the enforcer."""
        await self.fence("startup")
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name="ha-lease-renewer"),
            asyncio.create_task(self._enforce_loop(), name="ha-watchdog"),
        ]

    async def stop(self) -> None:
        """Stop; the lease is released only when no HA guest runs here, else it runs out."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._dropping is not None:
            self._dropping.cancel()
        vmids = self.ha_vmids()
        # After the shutdown policy ran, no HA guest is left here and the lease goes at once.
        unprotected = (
            self.state is WatchdogState.ARMED and bool(vmids) and await self.present(vmids)
        )
        if not unprotected:
            with contextlib.suppress(RucherError):
                await self.lease.release()
        if self.guard is not None:
            # With HA guests left the guard kills them now: nobody renews the lease any more.
            await self.guard.close(disarm=not unprotected)

    async def _renew_loop(self) -> None:
        every = self.settings.renew_interval
        while True:
            try:
                async with asyncio.timeout(every):
                    await self._renew_once()
            except TimeoutError:
                log.warning("ha_lease_renewal_slow", timeout=every)
                continue
            except RucherError as err:
                if err.code is ErrorCode.STALE_TOKEN:
                    log.warning("ha_lease_lost", error=err.message)
                    await self.fence("lease_lost")
                else:
                    log.warning("ha_lease_renewal_failed", error=err.message)
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            await asyncio.sleep(every)

    async def _renew_once(self) -> None:
        if self._dropping is not None:
            return  # the fenced lease is being given up: it must never be extended again
        if self.lease.token is None:
            await self.lease.try_acquire()
        else:
            await self.lease.renew()
        # Armed only once a write under the token is confirmed (an acquisition whose renewal
        # timed out is finished by the next renewal).
        if self.lease.token is not None and self.state is not WatchdogState.ARMED:
            self.state = WatchdogState.ARMED
            self._held_token = self.lease.token
            log.info("ha_lease_acquired", token=self.lease.token)

    async def _enforce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick)
            await self.enforce()

    async def enforce(self) -> None:
        """One check: past the deadline, kill; tell the guard the deadlines in force."""
        now = self.clock()
        vmids = self.ha_vmids()
        if self.state is WatchdogState.ARMED and now >= self.kill_at():
            await self.fence("deadline")
        elif self.state is not WatchdogState.ARMED and vmids and await self.present(vmids):
            # No HA guest may run here without a held lease, whoever started it (a start made
            # under an epoch that a late renewal kept alive after the fence, for one).
            await self.sweep()
        if self.guard is not None:
            guard_at = self.kill_at() + self.settings.destroy_timeout
            await self.guard.arm(guard_at, self.lease.deadline, vmids)

    async def fence(self, reason: str) -> None:
        """Kill this node's HA guests now and wait for a new lease before any may run again."""
        async with self._killing:
            if self.state is WatchdogState.FENCED:
                return
            # The lease may have dropped its token already (lost): fence under the one held.
            token = self._held_token or 0
            deadline = self.kill_at()
            vmids = self.ha_vmids()
            started = self.clock()
            killed, clean = await self.killer(vmids)
            # A new lease (a new epoch) is needed before HA guests may run here again.
            self._held_token = None
            self.state = WatchdogState.FENCED
            self.fenced_token = token
            if clean and self.lease.token is not None:
                # Every HA guest is dead: give the epoch up now, so the others need not wait
                # for it to expire (it still expires on its own if the bus does not answer).
                self._dropping = asyncio.create_task(self._drop_lease())
            else:
                self.lease.token = None
            quiet = reason == "startup" and not killed
            (log.info if quiet else log.warning)(
                "ha_startup_sweep" if quiet else "ha_self_fenced",
                reason=reason,
                killed=killed,
                clean=clean,
                token=token,
                ms=round((self.clock() - started) * 1000, 1),
                before_expiry_s=round(self.lease.deadline - self.clock(), 3),
            )
        if self.on_fenced is not None and killed:
            asyncio.get_running_loop().create_task(self.on_fenced(killed, token, deadline))

    async def _drop_lease(self) -> None:
        try:
            async with asyncio.timeout(self.settings.lease_ttl):
                await self.lease.release()
            log.info("ha_fenced_lease_released")
        except (TimeoutError, RucherError) as err:
            log.warning("ha_fenced_lease_not_released", error=str(err))
        finally:
            self.lease.token = None
            self._dropping = None

    async def sweep(self) -> None:
        """Kill HA guests found running while no lease is held (the lease stays as it is)."""
        async with self._killing:
            killed, clean = await self.killer(self.ha_vmids())
        log.warning("ha_guest_killed_without_lease", killed=killed, clean=clean)
