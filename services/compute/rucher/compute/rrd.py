"""Per-guest time series kept in memory like Proxmox's RRDs: bounded rings per timeframe.

Each timeframe of ``rrddata`` has its step and 70 rows (Proxmox's ``create_rrd_data``: hour
60 s, day 30 min, week 3 h, month 12 h, year 1 week). A sample is folded into the current
step of every timeframe (its average and its maximum); a finished step goes into a fixed-size
ring of float32 values, so a guest costs about 25 KiB however long the agent runs.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from rucher.bus import RucherError
from rucher.compute.domain_xml import vmid_of
from rucher.proto import compute
from rucher.proto.compute import RrdConsolidation, RrdTimeframe

log = structlog.get_logger("rucher.compute.rrd")

ROWS = 70
STEPS: dict[RrdTimeframe, int] = {
    RrdTimeframe.HOUR: 60,
    RrdTimeframe.DAY: 30 * 60,
    RrdTimeframe.WEEK: 180 * 60,
    RrdTimeframe.MONTH: 720 * 60,
    RrdTimeframe.YEAR: 10080 * 60,
}
FIELDS = (
    "cpu", "maxcpu", "mem", "maxmem", "disk", "maxdisk", "diskread", "diskwrite", "netin",
    "netout",
)  # fmt: skip
NAN = float("nan")


@dataclass(frozen=True)
class DomainStats:
    """Cumulative counters of one running domain at one moment."""

    name: str
    cpu_time_ns: int
    vcpus: int
    memory: int
    max_memory: int
    max_disk: int
    disk_read: int
    disk_write: int
    net_in: int
    net_out: int


class StatsSource(Protocol):
    """Counters of every running domain (one libvirt call: ``getAllDomainStats``)."""

    async def stats(self) -> list[DomainStats]:
        """The running domains' counters."""

    async def defined(self) -> list[str]:
        """The names of every domain, running or not."""


class Archive:
    """One timeframe of one guest: the step being filled and a ring of finished steps."""

    def __init__(self, step: int, rows: int = ROWS) -> None:
        self.step = step
        self.rows = rows
        width = rows * len(FIELDS)
        self.times = array("q", [0]) * rows
        self.average = array("f", [NAN]) * width
        self.maximum = array("f", [NAN]) * width
        self.bucket = -1
        self.sums = [0.0] * len(FIELDS)
        self.counts = [0] * len(FIELDS)
        self.peaks = [NAN] * len(FIELDS)

    def add(self, at: float, values: Mapping[str, float]) -> None:
        """Fold one sample taken at ``at`` (epoch seconds) into its step."""
        bucket = int(at) // self.step
        if bucket != self.bucket:
            if self.bucket >= 0:
                self._store()
            self.bucket = bucket
            self.sums = [0.0] * len(FIELDS)
            self.counts = [0] * len(FIELDS)
            self.peaks = [NAN] * len(FIELDS)
        for index, name in enumerate(FIELDS):
            value = values.get(name)
            if value is None or math.isnan(value):
                continue
            self.sums[index] += value
            self.counts[index] += 1
            peak = self.peaks[index]
            self.peaks[index] = value if math.isnan(peak) else max(peak, value)

    def _current(self) -> tuple[list[float], list[float]]:
        average = [
            total / count if count else NAN
            for total, count in zip(self.sums, self.counts, strict=True)
        ]
        return average, list(self.peaks)

    def _store(self) -> None:
        slot = self.bucket % self.rows
        self.times[slot] = self.bucket * self.step
        average, peaks = self._current()
        base = slot * len(FIELDS)
        for index in range(len(FIELDS)):
            self.average[base + index] = average[index]
            self.maximum[base + index] = peaks[index]

    def points(self, now: float, cf: RrdConsolidation) -> list[compute.RrdPoint]:
        """The ``rows`` steps ending with the current one, oldest first (``None`` where empty)."""
        last = int(now) // self.step
        ring = self.average if cf is RrdConsolidation.AVERAGE else self.maximum
        current_average, current_peaks = self._current()
        current = current_average if cf is RrdConsolidation.AVERAGE else current_peaks
        points = []
        for bucket in range(last - self.rows + 1, last + 1):
            start = bucket * self.step
            values: list[float] | None = None
            if bucket == self.bucket:
                values = current
            else:
                slot = bucket % self.rows
                if bucket >= 0 and self.times[slot] == start and start:
                    base = slot * len(FIELDS)
                    values = list(ring[base : base + len(FIELDS)])
            fields = {}
            if values is not None:
                fields = {
                    name: float(value)
                    for name, value in zip(FIELDS, values, strict=True)
                    if not math.isnan(value)
                }
            points.append(compute.RrdPoint(time=start, **fields))
        return points


@dataclass
class _Last:
    at: float
    stats: DomainStats


class RrdStore:
    """Every guest's archives on this node, fed by :meth:`record`, read by :meth:`series`."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.archives: dict[int, dict[RrdTimeframe, Archive]] = {}
        self._last: dict[int, _Last] = {}

    def record(self, samples: Iterable[DomainStats], at: float | None = None) -> None:
        """Fold one sampling round in; guests absent from it get no point (a gap)."""
        now = self.clock() if at is None else at
        seen = set()
        for stats in samples:
            vmid = vmid_of(stats.name)
            if vmid is None:
                continue
            seen.add(vmid)
            values = self._values(vmid, stats, now)
            archives = self.archives.setdefault(
                vmid, {frame: Archive(step) for frame, step in STEPS.items()}
            )
            for archive in archives.values():
                archive.add(now, values)
            self._last[vmid] = _Last(at=now, stats=stats)
        for vmid in set(self._last) - seen:
            del self._last[vmid]  # stopped: the next start's counters begin again at zero

    def _values(self, vmid: int, stats: DomainStats, now: float) -> dict[str, float]:
        values = {
            "maxcpu": float(stats.vcpus),
            "mem": float(stats.memory),
            "maxmem": float(stats.max_memory),
            "disk": 0.0,  # the guest's filesystem use needs its agent; Proxmox reports 0 too
            "maxdisk": float(stats.max_disk),
        }
        last = self._last.get(vmid)
        elapsed = now - last.at if last is not None else 0.0
        if last is None or elapsed <= 0:
            return values
        before = last.stats

        def rate(now_value: int, then: int) -> float | None:
            return (now_value - then) / elapsed if now_value >= then else None

        cpu = rate(stats.cpu_time_ns, before.cpu_time_ns)
        if cpu is not None:
            values["cpu"] = min(1.0, cpu / 1e9 / max(1, stats.vcpus))
        for name, now_value, then in (
            ("diskread", stats.disk_read, before.disk_read),
            ("diskwrite", stats.disk_write, before.disk_write),
            ("netin", stats.net_in, before.net_in),
            ("netout", stats.net_out, before.net_out),
        ):
            value = rate(now_value, then)
            if value is not None:
                values[name] = value
        return values

    def forget(self, keep: Iterable[int]) -> None:
        """Drop the archives of guests no longer on this node."""
        wanted = set(keep)
        for vmid in set(self.archives) - wanted:
            del self.archives[vmid]
            self._last.pop(vmid, None)

    def series(self, query: compute.VmRrdQuery) -> compute.VmRrdSeries:
        """The ``rrddata`` answer for one guest: 70 points, empty ones where nothing ran."""
        archives = self.archives.get(query.vmid)
        now = self.clock()
        if archives is None:
            archive = Archive(STEPS[query.timeframe])
            return compute.VmRrdSeries(vmid=query.vmid, points=tuple(archive.points(now, query.cf)))
        points = archives[query.timeframe].points(now, query.cf)
        return compute.VmRrdSeries(vmid=query.vmid, points=tuple(points))


class RrdService:
    """Samples this node's guests every ``interval`` seconds and answers ``rrddata``."""

    def __init__(
        self,
        source: StatsSource,
        store: RrdStore,
        check_owned: Callable[[int], Awaitable[object]],
        *,
        interval: float = 20.0,
    ) -> None:
        self.source = source
        self.store = store
        self.check_owned = check_owned
        self.interval = interval

    async def sample(self) -> None:
        """One sampling round; archives of guests whose domain is gone are dropped."""
        self.store.record(await self.source.stats())
        names = await self.source.defined()
        self.store.forget(vmid for name in names if (vmid := vmid_of(name)) is not None)

    async def run(self) -> None:
        """Sample forever; a failed round is logged and the next one tried."""
        while True:
            try:
                await self.sample()
            except RucherError as err:
                log.warning("rrd_sample_failed", error=err.message)
            await asyncio.sleep(self.interval)

    async def rrddata(self, query: compute.VmRrdQuery) -> compute.VmRrdSeries:
        """A guest's series; ``not_found`` unless this node owns it."""
        await self.check_owned(query.vmid)
        return self.store.series(query)
