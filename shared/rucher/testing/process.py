"""One owned process: started in its own session with a log file, and found again later by pid.

The dev-stack supervisor and the multi-node harness both own processes they must be able to crash
(SIGKILL of the whole process group), stop cleanly, and sometimes find again from another process
(``ops/harness kill n2`` runs after ``ops/harness up`` has exited). A pid alone is not an identity,
so the kernel's start time of the process is recorded beside it and checked before any signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLL_INTERVAL = 0.05


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat.rpartition(")")[2].split()
    state, start_ticks = fields[0], int(fields[19])
    if state in {"Z", "X"}:
        return None
    return start_ticks


def is_same_process_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` still runs and is the process that was started at ``start_ticks``."""
    current = process_start_ticks(pid)
    return current is not None and (start_ticks is None or current == start_ticks)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or an empty string."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class ManagedProcess:
    """A process in its own session (so its group can be signalled whole), logging to a file.

    ``env`` holds variables added to the caller's environment. When the process was started by
    this Python process it is tracked through its ``Popen`` (and reaped); otherwise through
    ``pid`` and ``start_ticks`` read back from a saved description (``to_dict``/``from_dict``).
    """

    name: str
    argv: list[str]
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    start_ticks: int | None = None
    started_at: float = 0.0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def start(self) -> None:
        """Start the process unless it already runs."""
        if self.alive:
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.start_ticks = process_start_ticks(self.pid)
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        """Whether the process runs (a zombie or a reused pid counts as gone)."""
        if self.pid is None:
            return False
        if self.popen is None:
            return is_same_process_alive(self.pid, self.start_ticks)
        if self.popen.returncode is not None:
            return False
        # Look without reaping: while the leader is an unreaped zombie its pid cannot be reused,
        # so what is left of its group (children it started) can be killed safely first.
        try:
            exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            exited = None
        if exited is None and self.popen.poll() is None:
            return True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.poll()
        return False

    @property
    def returncode(self) -> int | None:
        """The exit status once a process started here has ended; None otherwise."""
        return None if self.popen is None else self.popen.poll()

    @property
    def uptime(self) -> float:
        """Seconds since this Python process started it (0 when it did not)."""
        return time.monotonic() - self.started_at if self.started_at and self.alive else 0.0

    def signal_group(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process group while its leader is known to be ours and alive.

        (What a leader leaves behind when it dies is killed as soon as ``alive`` sees it gone.)
        """
        if self.pid is not None and self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end; whether it did."""
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        return True

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        self.signal_group(signal.SIGKILL)
        self.wait(5.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not ended within ``timeout``."""
        if not self.alive:
            return
        self.signal_group(signal.SIGTERM)
        if not self.wait(timeout):
            self.kill()

    def tail_log(self, lines: int = 20) -> str:
        """The end of the process's log."""
        return tail(self.log_file, lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, enough to find the process again or start it anew."""
        return {
            "name": self.name,
            "argv": self.argv,
            "log_file": str(self.log_file),
            "env": self.env,
            "pid": self.pid if self.alive else None,
            "start_ticks": self.start_ticks if self.alive else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManagedProcess:
        """Rebuild a description written by ``to_dict``."""
        return cls(
            name=data["name"],
            argv=list(data["argv"]),
            log_file=Path(data["log_file"]),
            env=dict(data["env"]),
            pid=data["pid"],
            start_ticks=data["start_ticks"],
        )
