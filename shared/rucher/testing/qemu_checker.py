"""A split-brain checker independent of the bus: which QEMU runs which guest on which node, when.

Events from a cut-off node never arrive, so they prove nothing. This checker samples ``/proc``
itself (default every 50 ms, at least every 100 ms): every ``qemu-system-*`` process, the guest it
names (``-name guest=...``) and the network namespace it lives in, which in the multi-node
harness is the node (each node has its own namespace; :meth:`QemuChecker.for_harness` maps them).
It keeps, per guest and node, the intervals during which a QEMU process ran, and
:meth:`QemuChecker.double_runs` lists every time a guest ran on two nodes at once.

Times are ``CLOCK_BOOTTIME`` seconds, the clock ``/proc/PID/stat`` start times count in. An
interval starts at the process's own start time (exact to a clock tick) and ends when a sample
no longer sees it: ``last_seen`` is the last sample that saw it, ``gone_by`` the first that did
not. Strict checking (the default) counts a guest as running until ``gone_by``, so a hand-over
faster than one sampling period is reported rather than missed.

A live migration's target is a QEMU started with ``-incoming``: it runs no guest code until its
source has stopped and handed over, so its overlap with the guest's earlier process is a
migration, not a double run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rucher import qemuproc

NETNS_DIR = Path("/run/netns")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_PERIOD = 0.1


def boottime() -> float:
    """Seconds since boot, counting suspend (the clock of ``/proc/PID/stat`` start times)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class Interval:
    """One QEMU process of ``guest`` on ``node``: from its start until it was no longer seen."""

    guest: str
    node: str
    pid: int
    start: float
    last_seen: float
    gone_by: float | None = None
    incoming: bool = False

    def end(self, *, strict: bool) -> float:
        """When it stopped: ``gone_by`` when strict (or the latest sample while it runs)."""
        if strict and self.gone_by is not None:
            return self.gone_by
        return self.last_seen


@dataclass(frozen=True)
class DoubleRun:
    """``guest`` ran on two nodes at once, from ``start`` to ``end``."""

    guest: str
    nodes: tuple[str, str]
    start: float
    end: float

    def __str__(self) -> str:
        return (
            f"{self.guest} ran on {self.nodes[0]} and {self.nodes[1]} at once for "
            f"{(self.end - self.start) * 1000:.0f} ms (boottime {self.start:.3f}-{self.end:.3f})"
        )


# One process in a sample: pid, start ticks, guest, node, start time, migration target or not.
Seen = tuple[int, int, str, str, float, bool]


@dataclass
class RunLog:
    """Intervals per guest and node, built from samples; the pure part of the checker."""

    intervals: list[Interval] = field(default_factory=list)
    _open: dict[tuple[int, int], Interval] = field(default_factory=dict)

    def record(self, at: float, seen: Iterable[Seen]) -> None:
        """One sample at ``at``: ``(pid, start_ticks, guest, node, start, incoming)`` of each."""
        current: set[tuple[int, int]] = set()
        for pid, ticks, guest, node, start, incoming in seen:
            key = (pid, ticks)
            current.add(key)
            interval = self._open.get(key)
            if interval is None:
                interval = Interval(
                    guest=guest, node=node, pid=pid, start=start, last_seen=at, incoming=incoming
                )
                self._open[key] = interval
                self.intervals.append(interval)
            interval.last_seen = at
        for key in [key for key in self._open if key not in current]:
            self._open.pop(key).gone_by = at

    def close(self, at: float) -> None:
        """End every interval still open (the checker stops)."""
        for interval in self._open.values():
            interval.last_seen = max(interval.last_seen, at)
        self._open.clear()

    def running(self) -> dict[str, set[str]]:
        """The nodes each guest runs on at the last sample."""
        found: dict[str, set[str]] = {}
        for interval in self._open.values():
            found.setdefault(interval.guest, set()).add(interval.node)
        return found

    def double_runs(self, *, strict: bool = True) -> list[DoubleRun]:
        """Every pair of intervals of one guest on two different nodes that overlap.

        A later migration target (``incoming``) overlapping its source is a live migration.
        """
        by_guest: dict[str, list[Interval]] = {}
        for interval in self.intervals:
            by_guest.setdefault(interval.guest, []).append(interval)
        found: list[DoubleRun] = []
        for guest, intervals in sorted(by_guest.items()):
            ordered = sorted(intervals, key=lambda i: i.start)
            for index, first in enumerate(ordered):
                for second in ordered[index + 1 :]:
                    if second.start >= first.end(strict=strict):
                        break
                    if second.node == first.node or second.incoming:
                        continue
                    found.append(
                        DoubleRun(
                            guest=guest,
                            nodes=(first.node, second.node),
                            start=second.start,
                            end=min(first.end(strict=strict), second.end(strict=strict)),
                        )
                    )
        return found

    def placements(self, guest: str) -> list[tuple[str, float, float]]:
        """``(node, start, end)`` of every run of ``guest``, in start order."""
        return [
            (i.node, i.start, i.end(strict=False))
            for i in sorted(self.intervals, key=lambda i: i.start)
            if i.guest == guest
        ]


def netns_inode(name: str, directory: Path = NETNS_DIR) -> int:
    """The inode of the named network namespace (``ip netns add NAME``)."""
    return os.stat(directory / name).st_ino


Raw = tuple[int, int, str, int | None, float, bool]


def scan_raw(proc: Path = qemuproc.PROC) -> list[Raw]:
    """One sample: ``(pid, start ticks, guest, netns inode, start time, incoming)`` of each QEMU."""
    return [
        (p.pid, p.start_ticks, p.guest, p.netns, p.start_ticks / CLOCK_TICKS, p.incoming)
        for p in qemuproc.scan(proc)
    ]


class QemuChecker:
    """Samples ``/proc`` and keeps a :class:`RunLog`.

    ``nodes`` maps a network namespace inode to a node name; a process in any other namespace
    counts as running on ``netns:INODE`` (still a node of its own, so it can collide).
    ``guests`` keeps only the guests it accepts (default: all). With ``sampler="process"`` (the
    default) a child process of its own (``python -m rucher.testing.qemu_checker``, at a
    real-time priority where allowed) takes the samples and timestamps them, so a busy test
    process cannot delay them; ``"thread"`` samples in a thread of this process.
    """

    def __init__(
        self,
        nodes: Mapping[int, str],
        *,
        period: float = 0.05,
        guests: Callable[[str], bool] | None = None,
        proc: Path = qemuproc.PROC,
        sampler: str = "process",
    ) -> None:
        if sampler not in ("process", "thread"):
            raise ValueError(f"unknown sampler {sampler!r}")
        if period > MAX_PERIOD:
            raise ValueError(f"sample at least every {MAX_PERIOD} s")
        self.nodes = dict(nodes)
        self.period = period
        self.accept = guests or (lambda _name: True)
        self.proc = proc
        self.log = RunLog()
        self.samples = 0
        self.max_gap = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sampler = sampler
        self._child: subprocess.Popen[bytes] | None = None
        self._last_at: float | None = None

    @classmethod
    def for_harness(cls, harness: Any, **options: Any) -> QemuChecker:
        """A checker for every node of a ``rucher.testing.harness.Harness``."""
        nodes = {netns_inode(node.namespace): node.name for node in harness.nodes}
        return cls(nodes, **options)

    def node_of(self, inode: int | None) -> str:
        """The node a namespace inode stands for."""
        if inode is None:
            return "netns:?"
        return self.nodes.get(inode, f"netns:{inode}")

    def _record(self, at: float, raw: list[Raw]) -> None:
        seen = [
            (pid, ticks, guest, self.node_of(netns), started, incoming)
            for pid, ticks, guest, netns, started, incoming in raw
            if self.accept(guest)
        ]
        with self._lock:
            self.log.record(at, seen)
            self.samples += 1
            if self._last_at is not None:
                self.max_gap = max(self.max_gap, at - self._last_at)
            self._last_at = at

    def sample(self) -> None:
        """Take one sample now, in this process."""
        self._record(boottime(), scan_raw(self.proc))

    def _sample_in_thread(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def _read_child(self, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            data = json.loads(line)
            raw: list[Raw] = [
                (pid, ticks, guest, netns, started, incoming)
                for pid, ticks, guest, netns, started, incoming in data["seen"]
            ]
            self._record(data["at"], raw)

    def start(self) -> QemuChecker:
        """Start sampling in the background (the first sample is taken before this returns)."""
        self.sample()
        target = self._sample_in_thread
        if self.sampler == "process":
            argv = [sys.executable, "-m", "rucher.testing.qemu_checker"]
            argv += ["--period", str(self.period), "--proc", str(self.proc)]
            child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._child = child

            def target() -> None:
                self._read_child(child)

        self._thread = threading.Thread(target=target, name="qemu-checker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling; open intervals end at the last sample."""
        self._stop.set()
        if self._child is not None and self._child.stdin is not None:
            self._child.stdin.close()  # the sampler exits at the end of its input
            try:
                self._child.wait(5)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self.log.close(boottime())

    def running(self) -> dict[str, set[str]]:
        """The nodes each guest runs on at the last sample."""
        with self._lock:
            return self.log.running()

    def double_runs(self, *, strict: bool = True) -> list[DoubleRun]:
        """Every time a guest ran on two nodes at once."""
        with self._lock:
            return self.log.double_runs(strict=strict)

    def assert_no_double_runs(self, *, strict: bool = True) -> None:
        """Fail (AssertionError listing each) if any guest ever ran on two nodes at once."""
        found = self.double_runs(strict=strict)
        if found:
            raise AssertionError("split brain: " + "; ".join(str(run) for run in found))

    def __enter__(self) -> QemuChecker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(period: float, proc: Path) -> None:
    """The sampler child: one JSON line per sample on stdout until stdin closes."""
    # Samples must keep their pace on a busy machine: a real-time priority where allowed (root;
    # each sample is a short /proc scan, then a sleep, so it never holds a CPU), else a nicer one.
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(-10)
    stop = threading.Event()

    def watch_input() -> None:
        sys.stdin.buffer.read()
        stop.set()

    threading.Thread(target=watch_input, daemon=True).start()
    while not stop.is_set():
        sys.stdout.write(json.dumps({"at": boottime(), "seen": scan_raw(proc)}) + "\n")
        sys.stdout.flush()
        stop.wait(period)


def main() -> None:
    """``python -m rucher.testing.qemu_checker``: the sampler child of :class:`QemuChecker`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=float, default=0.05)
    parser.add_argument("--proc", type=Path, default=qemuproc.PROC)
    args = parser.parse_args()
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        _serve(args.period, args.proc)


if __name__ == "__main__":
    main()
