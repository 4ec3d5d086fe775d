"""Killing the compute agent (SIGKILL) in the middle of a start: one well-defined guest afterwards.

The agent runs as a process of its own against real NATS and libvirtd. The test freezes it
(SIGSTOP) at a chosen moment of a start task, checks the task is still running, kills it, starts
a new agent and asserts: the task ended failed with a reason (the reaper ends tasks of dead
workers), the guest is where libvirt had it when the agent died (stopped, or running), its
document is unlocked and agrees with libvirt, and nothing is left behind once it is destroyed.
"""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rucher.bus import Bus, RucherError
from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskStatus
from rucher.tasks import TaskStore
from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

from .buses import connected
from .test_compute_agent import (
    NODE,
    ask,
    cleanup_domain,
    cmd,
    guest_config,
    start_agent,
    stop_agent,
    task_end,
    wait_agent,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ATTEMPTS = 8


def domain_active(uri: str, vmid: int) -> bool | None:
    """Whether libvirt runs the guest's domain (None: not defined)."""
    connection = libvirt.open(uri)
    try:
        return bool(connection.lookupByName(f"rucher-{vmid}").isActive())
    except libvirt.libvirtError:
        return None
    finally:
        connection.close()


async def freeze_when(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 30.0
) -> None:
    """SIGSTOP the agent as soon as ``ready()`` holds (polled as fast as libvirt answers)."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(ready):
        assert time.monotonic() < deadline, "the moment to kill the agent never came"
    os.kill(process.pid, signal.SIGSTOP)


async def kill_during_start(
    bus: Bus,
    process: subprocess.Popen[bytes],
    vmid: int,
    moment: Callable[[], bool],
    uri: str,
) -> tuple[str, bool]:
    """Start the guest, freeze the agent at ``moment`` while the task still runs, kill it.

    Returns the task's UPID and whether libvirt ran the domain when the agent died. A start
    that finished before the freeze is undone (stopped) and tried again.
    """
    store = TaskStore(bus)
    for _ in range(ATTEMPTS):
        upid = await ask(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
        await freeze_when(process, moment)
        if (await store.get(upid)).status is TaskStatus.RUNNING:
            active = bool(domain_active(uri, vmid))
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            return upid, active
        os.kill(process.pid, signal.SIGCONT)
        assert (await task_end(bus, upid)).exitstatus == "OK"
        upid = await ask(bus, compute.GUEST_STOP, cmd(compute.VmStop, vmid))
        assert (await task_end(bus, upid)).exitstatus == "OK"
    raise AssertionError(f"every one of {ATTEMPTS} starts ended before the agent froze")


@pytest.mark.parametrize("moment", ["accepted", "qemu_launched"])
async def test_killing_the_agent_during_a_start_leaves_one_well_defined_guest(
    moment: str, nats_server, libvirtd: str, guest_image: GuestImage, tmp_path: Path
):
    vmid = 990_201 if moment == "accepted" else 990_202
    cleanup_domain(libvirtd, vmid)
    state = tmp_path / "state"
    process = start_agent(nats_server.url, state)
    restarted: subprocess.Popen[bytes] | None = None
    try:
        async with connected(nats_server.url, node=NODE) as bus:
            await wait_agent(bus, process)
            config = guest_config(guest_image, name="fault-test")
            upid = await ask(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
            assert (await task_end(bus, upid)).exitstatus == "OK"

            def launched() -> bool:
                return bool(domain_active(libvirtd, vmid))

            upid, active = await kill_during_start(
                bus,
                process,
                vmid,
                (lambda: True) if moment == "accepted" else launched,
                libvirtd,
            )
            if moment == "qemu_launched":
                assert active, "the agent was frozen before QEMU ran"
            # The guest is whatever libvirt made of it; the start's outcome is unknown to
            # nobody but the task, which must end failed with a reason.
            restarted = start_agent(nats_server.url, state)
            await wait_agent(bus, restarted)
            ended = await task_end(bus, upid, timeout=60)
            assert ended.exitstatus != "OK"
            assert "stopped before the task ended" in ended.exitstatus, ended.exitstatus

            active_now = domain_active(libvirtd, vmid)
            assert active_now is not None, "the guest's domain is gone"
            record = await GuestRegistry(bus).get(vmid)
            assert record.node == NODE
            assert record.lock is None
            status = await bus.request(
                compute.GUEST_STATUS.to(node=NODE), compute.VmStatusQuery(vmid=vmid)
            )
            want = PowerState.RUNNING if active_now else PowerState.STOPPED
            assert status.status is want
            # A domain QEMU ran when the agent died is still running: libvirt owns it.
            if active:
                assert active_now

            # And it is an ordinary guest again: it starts (if it must), stops and goes away.
            if not active_now:
                upid = await ask(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
                assert (await task_end(bus, upid)).exitstatus == "OK"
            upid = await ask(bus, compute.GUEST_STOP, cmd(compute.VmStop, vmid))
            assert (await task_end(bus, upid)).exitstatus == "OK"
            upid = await ask(bus, compute.GUEST_DESTROY, cmd(compute.VmDestroy, vmid, purge=True))
            assert (await task_end(bus, upid)).exitstatus == "OK"
            with pytest.raises(RucherError) as caught:
                await GuestRegistry(bus).get(vmid)
            assert caught.value.code is ErrorCode.NOT_FOUND
            assert domain_active(libvirtd, vmid) is None
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
        stop_agent(process)
        if restarted is not None:
            stop_agent(restarted)
        cleanup_domain(libvirtd, vmid)
