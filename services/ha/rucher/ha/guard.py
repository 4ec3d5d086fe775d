"""The watchdog's guard: a small separate process that kills the HA guests if its parent dies.

``python -m rucher.ha.guard`` reads lines from its parent (the HA node part) on stdin:

- ``arm KILL_AT EXPIRY VMIDS``: kill the guests ``VMIDS`` (comma-separated, ``-`` for none) when
  the monotonic clock (``CLOCK_MONOTONIC``, the same in every process) reaches ``KILL_AT``;
  ``EXPIRY`` is when the lease itself can run out, for the hardware watchdog.
- ``disarm``: the parent released its lease with no HA guest running: exit without killing.

End of input without ``disarm`` means the parent died: the guard kills the guests at once,
since nobody renews the lease any more. The guard also feeds ``/dev/watchdog`` when it exists,
only while the lease still has more than the device's timeout left, so that a guard that hangs
or dies still gets the node reset before the lease can expire for the others.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from rucher import qemuproc
from rucher.ha.hwdog import HardwareWatchdog
from rucher.ha.killer import sigkill_ha_processes, wait_gone

log = structlog.get_logger("rucher.ha.guard")


@dataclass
class GuardState:
    """What the guard knows: when to kill, when the lease expires, which guests."""

    kill_at: float | None = None
    expiry: float | None = None
    vmids: frozenset[int] = field(default_factory=frozenset)
    killed: bool = False

    def apply(self, line: str) -> bool:
        """Apply one line from the parent; False on ``disarm``."""
        parts = line.split()
        if not parts:
            return True
        if parts[0] == "disarm":
            return False
        if parts[0] != "arm" or len(parts) != 4:
            raise ValueError(f"unreadable guard line: {line!r}")
        kill_at, self.expiry = float(parts[1]), float(parts[2])
        self.vmids = frozenset() if parts[3] == "-" else frozenset(map(int, parts[3].split(",")))
        if kill_at != self.kill_at:
            # A new deadline (a renewal, or a new lease): kill once more when it passes.
            self.kill_at, self.killed = kill_at, False
        return True

    def due(self, now: float) -> bool:
        """Whether the kill deadline has passed with the guests not yet killed."""
        return not self.killed and self.kill_at is not None and now >= self.kill_at


def encode_arm(kill_at: float, expiry: float, vmids: frozenset[int]) -> bytes:
    """The ``arm`` line for the guard."""
    listed = ",".join(str(v) for v in sorted(vmids)) or "-"
    return f"arm {kill_at:.6f} {expiry:.6f} {listed}\n".encode()


def kill(state: GuardState, netns: int | None, reason: str) -> bool:
    """SIGKILL the HA guests' QEMU processes; True once none is left."""
    killed = sigkill_ha_processes(state.vmids, netns)
    clean = wait_gone(state.vmids, netns)
    state.killed = True
    log.warning("guard_killed_ha_guests", reason=reason, vmids=killed, clean=clean)
    return clean


def run(tick: float, hardware: HardwareWatchdog) -> int:
    """Serve the parent until it disarms or dies."""
    state = GuardState()
    netns = qemuproc.own_netns()
    stdin = sys.stdin.buffer.fileno()
    buffered = b""
    opened = False
    while True:
        ready, _, _ = select.select([stdin], [], [], tick)
        if ready:
            chunk = os.read(stdin, 4096)
            if not chunk:
                clean = kill(state, netns, "parent_gone")
                if clean:
                    hardware.disarm()
                return 0 if clean else 1
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                if not state.apply(line.decode()):
                    hardware.disarm()
                    return 0
        if state.kill_at is not None and not opened:
            # Armed with the first deadline, not before: the parent may take a while to start.
            opened = True
            hardware.open()
        now = time.monotonic()
        if state.due(now):
            kill(state, netns, "deadline")
        # Feed the device only while a hang now would still reset the node before the lease
        # can expire elsewhere, or once nothing is left to protect.
        if state.killed or (state.expiry is not None and now + hardware.timeout < state.expiry):
            hardware.pet()


def main() -> None:
    """``python -m rucher.ha.guard``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tick", type=float, default=0.05)
    parser.add_argument("--hw-device", type=Path, default=Path("/dev/watchdog"))
    parser.add_argument("--hw-timeout", type=int, default=5)
    args = parser.parse_args()
    sys.exit(run(args.tick, HardwareWatchdog(args.hw_device, args.hw_timeout)))


if __name__ == "__main__":
    main()
