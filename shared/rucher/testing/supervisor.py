"""A small process supervisor: start children in order, restart crashed ones with backoff.

It runs in the foreground of its own process (``ops/up`` starts it in the background through
``rucher.testing.stack``), writes a pid file and a JSON status file that other commands read, and
on SIGTERM or SIGINT stops its children in reverse order (SIGTERM, then SIGKILL) before exiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from rucher.testing.process import ManagedProcess

log = structlog.get_logger("rucher.supervisor")

TICK = 0.1


@dataclass
class Child:
    """One supervised process and its restart bookkeeping.

    ``ready`` says when a freshly started child may be counted as up; without one, a child is up
    once it has stayed alive for ``settle`` seconds (so one that dies on import is not "ready").
    """

    process: ManagedProcess
    ready: Callable[[], bool] | None = None
    settle: float = 1.0
    restarts: int = 0
    failures_in_a_row: int = 0
    state: str = "new"
    next_start: float = 0.0
    was_ready: bool = False

    @property
    def name(self) -> str:
        """The child's name (also its log file's stem)."""
        return self.process.name

    def is_ready(self) -> bool:
        """Whether the running child passes its readiness check."""
        if not self.process.alive:
            return False
        if self.ready is not None:
            return self.ready()
        return self.process.uptime >= self.settle


@dataclass
class Supervisor:
    """Run ``children`` until told to stop, restarting each one that exits.

    Backoff doubles from ``initial_backoff`` up to ``max_backoff`` and resets once a child has
    stayed up for ``stable_after`` seconds. Children start in list order, each after the previous
    one is ready (or ``start_timeout`` has passed), and stop in reverse order.
    """

    children: list[Child]
    pid_file: Path
    status_file: Path
    extra_status: dict[str, Any] = field(default_factory=dict)
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    stable_after: float = 10.0
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    _stopping: threading.Event = field(default_factory=threading.Event)
    _last_status: str = ""

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Ask the run loop to stop its children and return (a signal handler)."""
        log.info("supervisor_stop_requested", signal=signal.Signals(signum).name)
        self._stopping.set()

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; the exit status for the supervisor process."""
        previous = {
            signum: signal.signal(signum, self.request_stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{os.getpid()}\n")
        log.info("supervisor_started", pid=os.getpid(), children=[c.name for c in self.children])
        try:
            self._start_in_order()
            while not self._stopping.is_set():
                self._check_children()
                self._write_status()
                self._stopping.wait(TICK)
        finally:
            self._stop_children()
            self._write_status()
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            log.info("supervisor_stopped")
        return 0

    def _start_in_order(self) -> None:
        for child in self.children:
            if self._stopping.is_set():
                return
            self._start(child)
            deadline = time.monotonic() + self.start_timeout
            while not self._stopping.is_set() and time.monotonic() < deadline:
                self._check_children()
                self._write_status()
                if child.was_ready:
                    break
                self._stopping.wait(TICK)

    def _start(self, child: Child) -> None:
        child.process.start()
        child.state = "starting"
        log.info("child_started", child=child.name, pid=child.process.pid)

    def _check_children(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.state == "new":
                continue
            if child.state == "backoff":
                if now >= child.next_start:
                    child.restarts += 1
                    self._start(child)
                continue
            if child.process.alive:
                if child.state == "starting" and child.is_ready():
                    child.state = "running"
                    child.was_ready = True
                    log.info("child_ready", child=child.name, pid=child.process.pid)
                if child.process.uptime >= self.stable_after:
                    child.failures_in_a_row = 0
                continue
            delay = min(self.max_backoff, self.initial_backoff * 2**child.failures_in_a_row)
            child.failures_in_a_row += 1
            child.state = "backoff"
            child.next_start = now + delay
            log.warning(
                "child_exited",
                child=child.name,
                returncode=child.process.returncode,
                restart_in_s=round(delay, 2),
                log_file=str(child.process.log_file),
            )

    def _stop_children(self) -> None:
        for child in reversed(self.children):
            if child.process.alive:
                log.info("child_stopping", child=child.name, pid=child.process.pid)
                child.process.stop(self.stop_timeout)
            child.state = "stopped"

    @property
    def ready(self) -> bool:
        """Whether every child is running and has passed its readiness check."""
        return all(child.state == "running" for child in self.children)

    def status(self) -> dict[str, Any]:
        """What the status file holds: the supervisor, each child, and ``extra_status``."""
        return {
            **self.extra_status,
            "supervisor_pid": os.getpid(),
            "ready": self.ready and not self._stopping.is_set(),
            "stopping": self._stopping.is_set(),
            "children": {
                child.name: {
                    "pid": child.process.pid if child.process.alive else None,
                    "start_ticks": child.process.start_ticks if child.process.alive else None,
                    "state": child.state,
                    "restarts": child.restarts,
                    "was_ready": child.was_ready,
                    "log_file": str(child.process.log_file),
                }
                for child in self.children
            },
        }

    def _write_status(self) -> None:
        text = json.dumps(self.status(), indent=2) + "\n"
        if text == self._last_status:
            return
        # Write-then-rename so a reader never sees half a file.
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.status_file.with_suffix(".tmp")
        partial.write_text(text)
        partial.replace(self.status_file)
        self._last_status = text
