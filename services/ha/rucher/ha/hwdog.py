"""The kernel watchdog device (``/dev/watchdog``) as a second line behind the userspace watchdog.

Opened, the device resets the machine unless it is written to within its timeout; writing ``V``
before closing disarms it ("magic close"). Where no device exists (these machines have none),
:meth:`HardwareWatchdog.open` reports so and every other call does nothing.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import structlog

log = structlog.get_logger("rucher.ha.hwdog")

# <linux/watchdog.h>: _IOWR('W', 6, int)
WDIOC_SETTIMEOUT = 0xC0045706


class HardwareWatchdog:
    """A watchdog device, armed on open, fed by :meth:`pet`, disarmed only by :meth:`disarm`."""

    def __init__(self, device: Path, timeout: int) -> None:
        self.device = device
        self.timeout = timeout
        self._fd: int | None = None

    @property
    def armed(self) -> bool:
        """Whether the device is open (and will reset the node unless fed)."""
        return self._fd is not None

    def open(self) -> bool:
        """Open and arm the device with ``timeout``; False (and nothing armed) if it is absent."""
        if not self.device.exists():
            log.info("hw_watchdog_absent", device=str(self.device))
            return False
        try:
            self._fd = os.open(self.device, os.O_WRONLY)
        except OSError as err:
            log.warning("hw_watchdog_unusable", device=str(self.device), error=str(err))
            return False
        try:
            fcntl.ioctl(self._fd, WDIOC_SETTIMEOUT, struct.pack("i", self.timeout))
        except OSError as err:
            # Some drivers have a fixed timeout; the device still resets, at its own pace.
            log.warning("hw_watchdog_timeout_not_set", timeout=self.timeout, error=str(err))
        log.info("hw_watchdog_armed", device=str(self.device), timeout=self.timeout)
        return True

    def pet(self) -> None:
        """Feed the device (nothing when it is not open)."""
        if self._fd is not None:
            os.write(self._fd, b"\0")

    def disarm(self) -> None:
        """Magic close: the device stops counting (only when no HA guest runs unprotected)."""
        if self._fd is not None:
            os.write(self._fd, b"V")
            os.close(self._fd)
            self._fd = None
