"""The HA node watchdog: kill deadline, renewal, guard process, /proc kill, hardware watchdog."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rucher import qemuproc
from rucher.bus import RucherError
from rucher.ha import killer
from rucher.ha.config import HaNodeSettings, WatchdogSettings
from rucher.ha.guard import GuardState, encode_arm
from rucher.ha.hwdog import HardwareWatchdog
from rucher.ha.watchdog import GuardLink, NodeWatchdog, WatchdogState
from rucher.proto.errors import ErrorCode
from rucher.service import Settings, SettingsError

FAST = WatchdogSettings(
    lease_ttl=2.0, renew_interval=0.2, kill_margin=0.7, tick=0.02, destroy_timeout=0.2, hw_timeout=1
)


class FakeLease:
    """A lease whose renewals succeed until ``failing`` is set (then they hang or fail)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.token: int | None = None
        self.deadline = 0.0
        self.failing: str | None = None
        self.next_token = 10
        self.released = False

    async def try_acquire(self) -> bool:
        if self.failing:
            return False
        self.token, self.deadline = self.next_token, time.monotonic() + self.ttl
        self.next_token += 1
        return True

    async def renew(self) -> None:
        sent = time.monotonic()
        if self.failing == "hang":
            await asyncio.sleep(3600)
        if self.failing == "unavailable":
            raise RucherError(ErrorCode.UNAVAILABLE, "no responders")
        if self.failing == "stale":
            self.token = None
            raise RucherError(ErrorCode.STALE_TOKEN, "lease lost")
        self.deadline = sent + self.ttl

    async def release(self) -> None:
        self.released = True
        self.token = None


class FakeKiller:
    """Records when and what it was asked to kill."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, frozenset[int]]] = []

    async def __call__(self, vmids: frozenset[int]) -> tuple[list[int], bool]:
        self.calls.append((time.monotonic(), vmids))
        return sorted(vmids), True


async def _armed(lease: FakeLease, kill: FakeKiller, **kw) -> NodeWatchdog:
    watchdog = NodeWatchdog(lease, lambda: frozenset({101, 102}), kill, FAST, **kw)
    await watchdog.start()
    for _ in range(100):
        if watchdog.state is WatchdogState.ARMED:
            return watchdog
        await asyncio.sleep(0.01)
    raise AssertionError("never armed")


async def test_a_healthy_lease_is_never_fenced():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = await _armed(lease, kill)
    kill.calls.clear()  # the start-up sweep of leftovers
    await asyncio.sleep(FAST.lease_ttl * 1.5)
    assert kill.calls == []
    assert watchdog.epoch == 10
    await watchdog.stop()


@pytest.mark.parametrize("failure", ["hang", "unavailable"])
async def test_renewals_that_stop_succeeding_kill_before_the_lease_can_expire(failure):
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = await _armed(lease, kill)
    kill.calls.clear()
    lease.failing = failure
    await asyncio.sleep(FAST.lease_ttl + 0.5)
    assert len(kill.calls) == 1
    killed_at, vmids = kill.calls[0]
    assert vmids == {101, 102}
    # Killed after the deadline, and before the lease's conservative expiry by the margin.
    assert lease.deadline - FAST.kill_margin <= killed_at
    assert killed_at <= lease.deadline - FAST.kill_margin + 3 * FAST.tick
    assert watchdog.state is WatchdogState.FENCED
    assert watchdog.epoch is None
    await watchdog.stop()


async def test_a_lost_lease_kills_at_once_and_a_new_lease_has_a_new_epoch():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = await _armed(lease, kill)
    kill.calls.clear()
    lease.failing = "stale"
    await asyncio.sleep(FAST.renew_interval * 2)
    assert len(kill.calls) == 1
    assert watchdog.fenced_token == 10
    lease.failing = None
    await asyncio.sleep(FAST.renew_interval * 3)
    assert watchdog.state is WatchdogState.ARMED
    assert watchdog.epoch == 11
    await watchdog.stop()


async def test_a_clean_fence_gives_the_epoch_up_and_renews_it_never_again():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = await _armed(lease, kill)
    lease.failing = "hang"
    await asyncio.sleep(FAST.lease_ttl)
    assert watchdog.state is WatchdogState.FENCED
    assert lease.released, "the fenced epoch is released at once"
    await watchdog.stop()


async def test_a_ha_guest_appearing_while_fenced_is_killed_again():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    running = {"now": False}

    async def present(vmids: frozenset[int]) -> bool:
        return running["now"]

    watchdog = await _armed(lease, kill, present=present)
    lease.failing = "unavailable"
    await asyncio.sleep(FAST.lease_ttl)
    assert watchdog.state is WatchdogState.FENCED
    calls = len(kill.calls)
    running["now"] = True  # someone started an HA guest here under the dead epoch
    await asyncio.sleep(FAST.tick * 5)
    assert len(kill.calls) > calls
    running["now"] = False
    lease.failing = None
    await asyncio.sleep(FAST.renew_interval * 3)
    assert watchdog.state is WatchdogState.ARMED
    calls = len(kill.calls)
    running["now"] = True  # armed again: HA guests may run
    await asyncio.sleep(FAST.tick * 5)
    assert len(kill.calls) == calls
    await watchdog.stop()


async def test_an_acquisition_that_timed_out_is_armed_by_the_next_renewal():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = NodeWatchdog(lease, frozenset, kill, FAST)
    lease.token, lease.deadline = 42, time.monotonic() + FAST.lease_ttl  # held, never confirmed
    await watchdog._renew_once()
    assert watchdog.state is WatchdogState.ARMED and watchdog.epoch == 42


async def test_start_sweeps_leftover_ha_guests_before_any_lease():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = await _armed(lease, kill)
    assert kill.calls and kill.calls[0][1] == {101, 102}
    await watchdog.stop()


async def _running(vmids: frozenset[int]) -> bool:
    return True


async def _gone(vmids: frozenset[int]) -> bool:
    return False


async def test_stop_with_ha_guests_running_here_keeps_the_lease_to_run_out():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = await _armed(lease, kill, present=_running)
    await watchdog.stop()
    assert not lease.released


async def test_stop_after_the_shutdown_policy_moved_every_ha_guest_releases_the_lease():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = await _armed(lease, kill, present=_gone)  # HA guests exist, none runs here
    kill.calls.clear()
    await watchdog.stop()
    assert lease.released
    assert kill.calls == []


async def test_stop_without_ha_guests_releases_the_lease():
    lease, kill = FakeLease(FAST.lease_ttl), FakeKiller()
    watchdog = NodeWatchdog(lease, frozenset, kill, FAST)
    await watchdog.start()
    await asyncio.sleep(0.1)
    await watchdog.stop()
    assert lease.released


def test_settings_refuse_a_margin_that_cannot_cover_the_kill():
    with pytest.raises(SettingsError, match="KILL_MARGIN"):
        WatchdogSettings(lease_ttl=10, kill_margin=1.0, destroy_timeout=1.0)
    with pytest.raises(SettingsError, match="LEASE_TTL"):
        WatchdogSettings(lease_ttl=4, renew_interval=2, kill_margin=2.5)
    with pytest.raises(SettingsError, match="HW_TIMEOUT"):
        WatchdogSettings(lease_ttl=10, hw_timeout=8, kill_margin=3)


def test_settings_from_env_name_the_variable():
    base = Settings.from_env("ha", {})
    settings = HaNodeSettings.from_env(
        base, {"RUCHER_HA_LEASE_TTL": "12", "RUCHER_HA_FENCE_HOOK": "ipmitool -H 'a b' off"}
    )
    assert settings.watchdog.lease_ttl == 12
    assert settings.watchdog.kill_after == 10
    assert settings.fence_hook.command == ("ipmitool", "-H", "a b", "off")
    with pytest.raises(SettingsError, match="RUCHER_HA_RENEW_INTERVAL"):
        HaNodeSettings.from_env(base, {"RUCHER_HA_RENEW_INTERVAL": "soon"})


def test_default_timings_hold_the_documented_argument():
    defaults = WatchdogSettings()
    # A NATS KV fail-over of 4 s (measured 1-4 s) plus one renewal period fits before the kill.
    assert defaults.kill_after - defaults.renew_interval > 4.0
    assert defaults.kill_margin >= defaults.tick + 2 * defaults.destroy_timeout


def test_guard_lines():
    state = GuardState()
    assert state.apply(encode_arm(5.0, 8.0, frozenset({3, 1})).decode())
    assert (state.kill_at, state.expiry, state.vmids) == (5.0, 8.0, {1, 3})
    assert not state.due(4.9) and state.due(5.0)
    state.killed = True
    assert state.apply(encode_arm(5.0, 8.0, frozenset({3})).decode()) and not state.due(6.0)
    assert state.apply(encode_arm(7.0, 9.0, frozenset({3})).decode()) and state.due(7.0)
    assert state.apply(encode_arm(5.0, 8.0, frozenset()).decode()) and state.vmids == set()
    assert not state.apply("disarm")
    with pytest.raises(ValueError, match="unreadable"):
        state.apply("arm 1")


def test_hardware_watchdog_absent_is_skipped(tmp_path: Path):
    device = HardwareWatchdog(tmp_path / "watchdog", 5)
    assert not device.open()
    device.pet()
    device.disarm()
    assert not device.armed


def test_hardware_watchdog_pets_and_magic_closes(tmp_path: Path):
    fifo = tmp_path / "watchdog"
    fifo.touch()  # a plain file stands in: the ioctl fails, writes are recorded
    device = HardwareWatchdog(fifo, 5)
    assert device.open() and device.armed
    device.pet()
    device.disarm()
    assert fifo.read_bytes() == b"\0V"


def fake_qemu(vmid: int, *, incoming: bool = False) -> subprocess.Popen[bytes]:
    """A process whose command line looks like libvirt's QEMU for guest ``rucher-VMID``."""
    return subprocess.Popen(
        [
            "bash",
            "-c",
            f'exec -a qemu-system-x86_64 {sys.executable} -c "import time; time.sleep(60)" '
            f"-name guest=rucher-{vmid},debug-threads=on -uuid 00000000-0000-0000-0000-{vmid:012d}"
            + (" -incoming defer" if incoming else ""),
        ]
    )


def _wait_listed(vmid: int) -> qemuproc.QemuProcess:
    for _ in range(200):
        found = [p for p in qemuproc.scan() if p.guest == f"rucher-{vmid}"]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError("fake qemu not seen")


def test_proc_scan_and_sigkill_in_this_netns():
    ha, other = fake_qemu(901), fake_qemu(902, incoming=True)
    try:
        found = _wait_listed(901)
        assert found.uuid == "00000000-0000-0000-0000-000000000901"
        assert found.netns == qemuproc.own_netns()
        assert not found.incoming
        assert _wait_listed(902).incoming  # a live migration's target
        assert killer.sigkill_ha_processes({901}, qemuproc.own_netns()) == [901]
        assert killer.wait_gone({901}, qemuproc.own_netns())
        assert ha.wait(5) == -9
        # Another namespace's processes are not this node's: nothing is killed there.
        assert killer.sigkill_ha_processes({902}, -1) == []
        assert other.poll() is None
    finally:
        for process in (ha, other):
            process.kill()
            process.wait()


async def test_kill_ha_guests_without_libvirt_falls_back_to_proc():
    process = fake_qemu(903)
    try:
        _wait_listed(903)
        killed, clean = await killer.kill_ha_guests(
            frozenset({903}), uri="test:///nonexistent-socket-uri", destroy_timeout=0.5
        )
        assert killed == [903] and clean
    finally:
        process.kill()
        process.wait()


async def test_a_hung_libvirt_does_not_delay_the_proc_kill(monkeypatch):
    monkeypatch.setattr(killer, "destroy_domains", lambda uri, vmids: time.sleep(3) or [])
    process = fake_qemu(906)
    try:
        _wait_listed(906)
        started = time.monotonic()
        killed, clean = await killer.kill_ha_guests(
            frozenset({906}), uri="qemu:///hung", destroy_timeout=0.3
        )
        assert killed == [906] and clean
        assert time.monotonic() - started < 2.0
    finally:
        process.kill()
        process.wait()


async def test_guard_kills_when_its_parent_goes_away():
    process = fake_qemu(904)
    link = GuardLink(FAST)
    try:
        _wait_listed(904)
        now = time.monotonic()
        await link.arm(now + 60, now + 61, frozenset({904}))
        assert link.pid is not None
        await link.close(disarm=False)
        assert await asyncio.to_thread(process.wait, 5) == -9
    finally:
        process.kill()
        process.wait()


async def test_guard_kills_at_its_deadline_and_a_disarmed_guard_does_not():
    process = fake_qemu(905)
    link = GuardLink(FAST)
    try:
        _wait_listed(905)
        now = time.monotonic()
        await link.arm(now + 60, now + 61, frozenset({905}))
        await link.close(disarm=True)
        assert process.poll() is None
        link = GuardLink(FAST)
        now = time.monotonic()
        await link.arm(now + 0.3, now + 1, frozenset({905}))
        assert await asyncio.to_thread(process.wait, 5) == -9
        assert time.monotonic() >= now + 0.3
        await link.close(disarm=True)
    finally:
        process.kill()
        process.wait()


async def test_libvirt_destroys_only_running_ha_domains():
    libvirt = pytest.importorskip("libvirt")
    # test:///default is one driver per process: this connection and the killer's share it.
    connection = libvirt.open("test:///default")
    domains = {}
    for vmid in (556, 557):
        xml = (
            f"<domain type='test'><name>rucher-{vmid}</name><memory>8192</memory>"
            "<os><type>hvm</type></os></domain>"
        )
        domains[vmid] = connection.defineXML(xml)
        domains[vmid].create()
    try:
        killed, clean = await killer.kill_ha_guests(
            frozenset({556}), uri="test:///default", destroy_timeout=2.0
        )
        assert killed == [556] and clean
        assert not domains[556].isActive() and domains[557].isActive()
    finally:
        for domain in domains.values():
            if domain.isActive():
                domain.destroy()
            domain.undefine()
        connection.close()


async def test_a_hung_guard_is_replaced_instead_of_stalling_the_watchdog():
    link = GuardLink(FAST)
    now = time.monotonic()
    await link.arm(now + 60, now + 61, frozenset())
    first = link.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # hung: it reads nothing any more
    started = time.monotonic()
    for _ in range(3000):  # far more than a pipe holds
        await link.arm(now + 60, now + 61, frozenset(range(1000, 1100)))
        if link.pid != first:
            break
    assert time.monotonic() - started < 30
    assert link.pid is not None and link.pid != first
    await link.close(disarm=True)


def test_vmid_of_only_reads_rucher_names():
    assert killer.vmid_of("rucher-100") == 100
    assert killer.vmid_of("rucher-x") is None
    assert killer.vmid_of("other-100") is None
    assert os.getpid() > 0
