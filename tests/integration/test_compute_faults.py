"""Killing the compute agent (SIGKILL) during a start or a migration: one well-defined guest.

The agent runs as a process of its own against real NATS and libvirtd. The test freezes it
(SIGSTOP) at a chosen moment of a task, checks the task is still running, kills it, starts a new
agent and asserts: the task ended failed with a reason (the reaper ends tasks of dead workers),
the guest is in one place (for a start: where libvirt had it when the agent died; for a live
migration: still running on its node, libvirt's migration aborted, nothing on the target), its
document is unlocked and agrees with libvirt, and nothing is left behind.
"""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskStatus
from rucher.tasks import TaskStore
from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

from .buses import connected, until
from .test_compute_agent import (
    NODE,
    USER,
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
FULL_SPEED = 8192  # MiB/s


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


def domains(uri: str) -> dict[str, bool]:
    """A libvirtd's domains, name → active."""
    connection = libvirt.open(uri)
    try:
        return {domain.name(): bool(domain.isActive()) for domain in connection.listAllDomains()}
    finally:
        connection.close()


async def agent_answers(bus: Bus, node: str) -> bool:
    """Whether ``node``'s compute agent serves (a missing VM is ``not_found``)."""
    try:
        await bus.request(
            compute.GUEST_STATUS.to(node=node), compute.VmStatusQuery(vmid=999_999_998), timeout=2
        )
    except RucherError as err:
        return err.code is ErrorCode.NOT_FOUND
    return False


async def ask_n1(bus: Bus, subject, message) -> str:  # type: ignore[no-untyped-def]
    """Send ``message`` to the agent of harness node n1; the task's UPID."""
    reply = await bus.request(subject.to(node="n1"), message, timeout=60)
    return str(reply.upid)


@pytest.mark.parametrize("libvirt_finishes", [False, True], ids=["aborted", "finished"])
async def test_killing_the_agent_during_a_live_migration_leaves_the_guest_in_one_place(
    harness_factory, guest_image: GuestImage, libvirt_finishes: bool
):
    """The source agent dies mid-migration; libvirt's migration (which outlives it) is either
    still going when a new agent starts, which aborts it (the guest stays home), or finished
    by then (the guest runs on the target, which the new agent finds and hands ownership)."""
    harness = harness_factory(nodes=2, libvirt=True)
    for node in harness.nodes:
        extra = {"RUCHER_REGISTRY_TTL": "3", "RUCHER_STORAGE_LOCAL_PATH": str(node.state_dir)}
        node.start_service("storage", [sys.executable, "-m", "rucher.storage"], extra)
        node.start_service(
            "compute", [sys.executable, "-m", "rucher.compute"], {"RUCHER_REGISTRY_TTL": "3"}
        )
    n1, n2 = harness.node("n1"), harness.node("n2")
    vmid = 990_212 if libvirt_finishes else 990_211
    name = f"rucher-{vmid}"
    async with connected(harness.urls, node="n1", service="test") as bus:
        for node in ("n1", "n2"):
            await until(lambda node=node: agent_answers(bus, node), timeout=90, every=0.3)
        config = guest_config(guest_image, name="migrate-fault")
        upid = await ask_n1(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        upid = await ask_n1(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
        assert (await task_end(bus, upid)).exitstatus == "OK"

        # 1 MiB/s: the guest's memory takes tens of seconds to cross, time to kill the source.
        migrate = compute.VmMigrate(
            command_id=new_id(), vmid=vmid, user=USER, target="n2", online=True, bwlimit=1024
        )
        upid = await migrate_when_n2_is_seen(bus, migrate)
        await until(lambda: name in domains(n2.libvirtd.uri), timeout=60, every=0.1)
        agent = n1.processes["compute"]
        agent.signal_group(signal.SIGSTOP)
        state = await TaskStore(bus).get(upid)
        assert state.status is TaskStatus.RUNNING, "the migration ended before the agent froze"
        agent.kill()
        if libvirt_finishes:
            # With the agent gone, libvirt carries on; let it finish at full speed.
            await asyncio.to_thread(unthrottle, n1.libvirtd.uri, name)
            await until(
                lambda: domains(n2.libvirtd.uri).get(name) and not domains(n1.libvirtd.uri)[name],
                timeout=90,
                every=0.2,
            )
        agent.start()
        await until(lambda: agent_answers(bus, "n1"), timeout=90, every=0.3)

        ended = await task_end(bus, upid, timeout=60)
        assert "stopped before the task ended" in ended.exitstatus, ended.exitstatus
        home, away = ("n2", "n1") if libvirt_finishes else ("n1", "n2")
        uri = {"n1": n1.libvirtd.uri, "n2": n2.libvirtd.uri}
        record = await GuestRegistry(bus).get(vmid)
        seen = {node: domains(uri[node]) for node in uri}
        assert (record.node, record.lock) == (home, None), seen
        # Only its node has the guest, running, now and a little later.
        await until(lambda: domains(uri[away]) == {}, timeout=60, every=0.2)
        await asyncio.sleep(3)
        assert domains(uri[away]) == {}
        assert domains(uri[home]) == {name: True}
        status = await bus.request(
            compute.GUEST_STATUS.to(node=home), compute.VmStatusQuery(vmid=vmid)
        )
        assert status.status is PowerState.RUNNING
        with pytest.raises(RucherError) as caught:
            await bus.request(compute.GUEST_STATUS.to(node=away), compute.VmStatusQuery(vmid=vmid))
        assert caught.value.code is ErrorCode.NOT_FOUND

        # It is an ordinary guest again: it stops and goes away.
        stop = cmd(compute.VmStop, vmid)
        reply = await bus.request(compute.GUEST_STOP.to(node=home), stop, timeout=60)
        assert (await task_end(bus, reply.upid)).exitstatus == "OK"
        destroy = cmd(compute.VmDestroy, vmid, purge=True)
        reply = await bus.request(compute.GUEST_DESTROY.to(node=home), destroy, timeout=60)
        assert (await task_end(bus, reply.upid)).exitstatus == "OK"
        assert domains(uri[home]) == {}


async def migrate_when_n2_is_seen(bus: Bus, command: compute.VmMigrate) -> str:
    """Ask n1 to migrate; on this busy machine n2's registration may lapse for a moment."""
    deadline = time.monotonic() + 30
    while True:
        try:
            attempt = msgspec.structs.replace(command, command_id=new_id())
            reply = await bus.request(compute.GUEST_MIGRATE.to(node="n1"), attempt, timeout=60)
        except RucherError as err:
            if "no compute agent runs there" not in err.message or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        return str(reply.upid)


def unthrottle(uri: str, name: str) -> None:
    """Lift the bandwidth limit of the domain's running migration (libvirt goes on alone).

    The limit the migration was started with applies once QEMU streams: lift it after that.
    """
    connection = libvirt.open(uri)
    try:
        domain = connection.lookupByName(name)
        deadline = time.monotonic() + 60
        while domain.jobInfo()[3] == 0 or domain.migrateGetMaxSpeed(0) != FULL_SPEED:
            assert time.monotonic() < deadline, "the migration never streamed"
            if domain.jobInfo()[3]:
                domain.migrateSetMaxSpeed(FULL_SPEED, 0)
            time.sleep(0.1)
    finally:
        connection.close()
