"""The agent's in-memory RRD: steps, consolidation, bounded rings, rates from counters."""

from __future__ import annotations

import pytest

from rucher.compute.rrd import ROWS, STEPS, Archive, DomainStats, RrdStore
from rucher.proto.compute import RrdConsolidation, RrdTimeframe, VmRrdQuery

AVG, MAX = RrdConsolidation.AVERAGE, RrdConsolidation.MAX


def stats(cpu_s: float, *, read: int = 0, net: int = 0, name: str = "rucher-100") -> DomainStats:
    return DomainStats(
        name=name, cpu_time_ns=int(cpu_s * 1e9), vcpus=2, memory=100 << 20,
        max_memory=512 << 20, max_disk=1 << 30, disk_read=read, disk_write=0, net_in=net,
        net_out=0,
    )  # fmt: skip


def test_a_step_averages_and_keeps_the_peak():
    archive = Archive(60)
    archive.add(6000, {"cpu": 0.2})
    archive.add(6030, {"cpu": 0.6})
    average = archive.points(6059, AVG)[-1]
    peak = archive.points(6059, MAX)[-1]
    assert average.time == 6000
    assert average.cpu == pytest.approx(0.4)
    assert peak.cpu == pytest.approx(0.6)
    archive.add(6060, {"cpu": 1.0})  # the next step: the first is stored in the ring
    points = archive.points(6060, AVG)
    assert [point.time for point in points[-2:]] == [6000, 6060]
    assert points[-2].cpu == pytest.approx(0.4)
    assert points[-1].cpu == pytest.approx(1.0)


def test_the_ring_is_bounded_and_old_steps_fall_out():
    archive = Archive(60)
    for step in range(3 * ROWS):
        archive.add(60 * (1000 + step), {"mem": float(step)})
    now = 60 * (1000 + 3 * ROWS - 1)
    points = archive.points(now, AVG)
    assert len(points) == ROWS
    assert [point.mem for point in points] == [float(s) for s in range(2 * ROWS, 3 * ROWS)]
    assert len(archive.average) == ROWS * len(archive.sums)
    # A gap (nothing sampled) is a point without values.
    later = archive.points(now + 600, AVG)
    assert later[-1].mem is None
    assert later[-11].mem == float(3 * ROWS - 1)


def test_rates_come_from_counter_differences():
    store = RrdStore(clock=lambda: 1000.0)
    store.record([stats(10.0, read=0, net=0)], at=1000.0)
    store.record([stats(13.0, read=6000, net=600)], at=1010.0)
    series = store.series(VmRrdQuery(vmid=100, timeframe=RrdTimeframe.HOUR, cf=MAX))
    last = series.points[-1]
    assert len(series.points) == ROWS
    assert last.cpu == pytest.approx(3.0 / 10 / 2)  # 3 s of CPU in 10 s over 2 vCPUs
    assert last.diskread == pytest.approx(600.0)
    assert last.netin == pytest.approx(60.0)
    assert last.maxmem == 512 << 20
    assert last.maxcpu == 2
    assert last.time % STEPS[RrdTimeframe.HOUR] == 0


def test_a_restarted_guest_does_not_get_a_negative_rate():
    store = RrdStore(clock=lambda: 1020.0)
    store.record([stats(50.0)], at=1000.0)
    store.record([], at=1010.0)  # stopped
    store.record([stats(1.0)], at=1020.0)  # started again: counters from zero
    last = store.series(VmRrdQuery(vmid=100, timeframe=RrdTimeframe.HOUR)).points[-1]
    assert last.cpu is None or last.cpu >= 0


def test_unknown_guests_answer_empty_points_and_forgotten_ones_go():
    store = RrdStore(clock=lambda: 5000.0)
    store.record([stats(1.0), stats(1.0, name="rucher-101"), stats(1.0, name="other")], at=5000.0)
    assert set(store.archives) == {100, 101}
    store.forget([100])
    assert set(store.archives) == {100}
    empty = store.series(VmRrdQuery(vmid=101, timeframe=RrdTimeframe.YEAR))
    assert len(empty.points) == ROWS
    assert all(point.cpu is None for point in empty.points)
