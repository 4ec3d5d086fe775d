"""The HA node part's settings (lease, watchdog, fence hook), read once from the environment.

The timing argument behind the defaults is in ``services/ha/README.md`` ("Node lease and
watchdog"): the kill deadline (last renewal sent + TTL - margin) always comes before the lease
can expire for the other nodes, and the TTL outlasts a NATS KV fail-over plus a renewal period.
"""

from __future__ import annotations

import functools
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rucher.service import Settings, SettingsError, env_number

DEFAULT_LEASE_TTL = 7.0
DEFAULT_RENEW_INTERVAL = 0.5
DEFAULT_KILL_MARGIN = 2.0
DEFAULT_TICK = 0.1
DEFAULT_DESTROY_TIMEOUT = 0.5
DEFAULT_HW_TIMEOUT = 4
DEFAULT_FENCE_HOOK_TIMEOUT = 30.0


@dataclass(frozen=True)
class WatchdogSettings:
    """The node lease and its watchdog: how long, how often, how early to kill, what to kill."""

    lease_ttl: float = DEFAULT_LEASE_TTL
    renew_interval: float = DEFAULT_RENEW_INTERVAL
    kill_margin: float = DEFAULT_KILL_MARGIN
    tick: float = DEFAULT_TICK
    destroy_timeout: float = DEFAULT_DESTROY_TIMEOUT
    libvirt_uri: str = "qemu:///system"
    watchdog_device: Path = Path("/dev/watchdog")
    hw_timeout: int = DEFAULT_HW_TIMEOUT

    def __post_init__(self) -> None:
        if self.lease_ttl < 2.0:
            raise SettingsError("RUCHER_HA_LEASE_TTL must be at least 2 s")
        if self.kill_margin < self.tick + 2 * self.destroy_timeout:
            # libvirt gets destroy_timeout, then the guard's /proc kill gets as long again.
            raise SettingsError(
                "RUCHER_HA_KILL_MARGIN must cover one tick plus twice RUCHER_HA_DESTROY_TIMEOUT"
            )
        if self.renew_interval + self.kill_margin >= self.lease_ttl:
            raise SettingsError(
                "RUCHER_HA_LEASE_TTL must exceed RUCHER_HA_RENEW_INTERVAL + RUCHER_HA_KILL_MARGIN"
            )
        if self.hw_timeout + self.kill_margin >= self.lease_ttl:
            raise SettingsError(
                "RUCHER_HA_HW_TIMEOUT + RUCHER_HA_KILL_MARGIN must be under the TTL"
            )

    @property
    def kill_after(self) -> float:
        """Seconds after the last successful renewal was sent at which the guests are killed."""
        return self.lease_ttl - self.kill_margin


@dataclass(frozen=True)
class FenceHookSettings:
    """An optional external fence command (an IPMI power-off), run with a timeout."""

    command: tuple[str, ...] = ()
    timeout: float = DEFAULT_FENCE_HOOK_TIMEOUT


@dataclass(frozen=True)
class HaNodeSettings:
    """What the HA service's node part reads beyond every service's ``RUCHER_*`` settings."""

    base: Settings
    watchdog: WatchdogSettings
    fence_hook: FenceHookSettings

    @classmethod
    def from_env(cls, base: Settings, environ: Mapping[str, str] = os.environ) -> HaNodeSettings:
        """Read the settings, naming the variable at fault when one is wrong."""
        number = functools.partial(env_number, environ)

        hook = environ.get("RUCHER_HA_FENCE_HOOK", "")
        try:
            command = tuple(shlex.split(hook))
        except ValueError as err:
            raise SettingsError(f"RUCHER_HA_FENCE_HOOK={hook!r}: {err}") from err
        return cls(
            base=base,
            watchdog=WatchdogSettings(
                lease_ttl=number("RUCHER_HA_LEASE_TTL", DEFAULT_LEASE_TTL, 2.0),
                renew_interval=number("RUCHER_HA_RENEW_INTERVAL", DEFAULT_RENEW_INTERVAL, 0.1),
                kill_margin=number("RUCHER_HA_KILL_MARGIN", DEFAULT_KILL_MARGIN, 0.5),
                tick=number("RUCHER_HA_TICK", DEFAULT_TICK, 0.01),
                destroy_timeout=number("RUCHER_HA_DESTROY_TIMEOUT", DEFAULT_DESTROY_TIMEOUT, 0.1),
                # The compute agent's libvirt unless told otherwise: the guests it runs.
                libvirt_uri=environ.get("RUCHER_HA_LIBVIRT_URI")
                or environ.get("RUCHER_LIBVIRT_URI")
                or "qemu:///system",
                watchdog_device=Path(
                    environ.get("RUCHER_HA_WATCHDOG_DEVICE", "") or "/dev/watchdog"
                ),
                hw_timeout=int(number("RUCHER_HA_HW_TIMEOUT", DEFAULT_HW_TIMEOUT, 1)),
            ),
            fence_hook=FenceHookSettings(
                command=command,
                timeout=number("RUCHER_HA_FENCE_HOOK_TIMEOUT", DEFAULT_FENCE_HOOK_TIMEOUT, 1.0),
            ),
        )
