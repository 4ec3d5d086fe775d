"""The split-brain checker's interval logic (rucher.testing.qemu_checker.RunLog)."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from rucher.testing.qemu_checker import MAX_PERIOD, QemuChecker, RunLog


def _log(
    samples: list[tuple[float, list[tuple[int, str, str, float]]]], incoming: Collection[int] = ()
) -> RunLog:
    """A log of ``(pid, guest, node, start)`` samples; ``incoming`` pids are migration targets."""
    log = RunLog()
    for at, seen in samples:
        log.record(
            at,
            [(pid, 1, guest, node, start, pid in incoming) for pid, guest, node, start in seen],
        )
    return log


def test_a_hand_over_with_a_gap_is_not_a_double_run():
    log = _log(
        [
            (1.0, [(10, "g", "a", 0.5)]),
            (1.1, [(10, "g", "a", 0.5)]),
            (1.2, []),
            (1.3, []),
            (1.4, [(20, "g", "b", 1.35)]),
        ]
    )
    assert log.double_runs() == []
    assert log.placements("g") == [("a", 0.5, 1.1), ("b", 1.35, 1.4)]
    assert log.running() == {"g": {"b"}}


def test_two_nodes_in_one_sample_is_a_double_run():
    log = _log([(1.0, [(10, "g", "a", 0.5), (20, "g", "b", 0.9)]), (1.1, [(10, "g", "a", 0.5)])])
    (run,) = log.double_runs(strict=False)
    assert run.guest == "g" and set(run.nodes) == {"a", "b"}
    assert run.start == 0.9 and run.end == 1.0
    assert "g ran on a and b at once" in str(run)


def test_strict_checking_reports_a_hand_over_faster_than_a_sample():
    # a is last seen at 1.0 and gone at 1.1; b started at 1.05, in between.
    log = _log([(1.0, [(10, "g", "a", 0.5)]), (1.1, [(20, "g", "b", 1.05)])])
    assert log.double_runs(strict=False) == []
    (run,) = log.double_runs(strict=True)
    assert (run.start, run.end) == (1.05, 1.1)


def test_the_same_node_twice_and_other_guests_do_not_count():
    log = _log(
        [
            (1.0, [(10, "g", "a", 0.5), (11, "h", "b", 0.5)]),
            (1.1, [(10, "g", "a", 0.5), (12, "g", "a", 1.05), (11, "h", "b", 0.5)]),
        ]
    )
    assert log.double_runs() == []


def test_a_live_migrations_target_overlapping_its_source_is_not_a_double_run():
    # b's QEMU waits for the migration (-incoming) while a's runs, then a's stops.
    samples = [
        (1.0, [(10, "g", "a", 0.5)]),
        (1.1, [(10, "g", "a", 0.5), (20, "g", "b", 1.05)]),
        (1.5, [(10, "g", "a", 0.5), (20, "g", "b", 1.05)]),
        (1.6, [(20, "g", "b", 1.05)]),
    ]
    assert _log(samples, incoming={20}).double_runs() == []
    assert _log(samples).double_runs() != []  # the same overlap, started afresh: split brain


def test_a_fresh_start_beside_a_migration_target_is_a_double_run():
    log = _log(
        [
            (1.0, [(10, "g", "a", 0.5), (20, "g", "b", 0.9)]),
            (1.1, [(10, "g", "a", 0.5), (20, "g", "b", 0.9), (30, "g", "c", 1.05)]),
        ],
        incoming={20},
    )
    assert {run.nodes for run in log.double_runs()} == {("a", "c"), ("b", "c")}


def test_a_reused_pid_is_a_new_interval():
    log = RunLog()
    log.record(1.0, [(10, 100, "g", "a", 0.5, False)])
    log.record(1.1, [(10, 200, "g", "b", 1.05, False)])
    assert [i.node for i in log.intervals] == ["a", "b"]
    assert log.intervals[0].gone_by == 1.1
    assert len(log.double_runs(strict=True)) == 1


def test_close_ends_open_intervals():
    log = _log([(1.0, [(10, "g", "a", 0.5)])])
    log.close(2.0)
    assert log.placements("g") == [("a", 0.5, 2.0)]
    assert log.running() == {}


def test_sampling_slower_than_100ms_is_refused():
    with pytest.raises(ValueError, match="at least every"):
        QemuChecker({}, period=MAX_PERIOD * 2)
