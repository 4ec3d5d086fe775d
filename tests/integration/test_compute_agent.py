"""The compute agent as a process against real NATS and libvirtd, booting the test guest (TCG)."""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskState, TaskStatus
from rucher.tasks import TaskStore
from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

from .buses import connected, until

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE = "cn1"
USER = "root@pam"


def start_agent(
    nats_url: str, state: Path, node: str = NODE, **env: str
) -> subprocess.Popen[bytes]:
    """The compute agent as a process of its own, logging to ``state/compute-{node}.log``."""
    state.mkdir(parents=True, exist_ok=True)
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RUCHER_")},
        "RUCHER_NATS_URL": nats_url,
        "RUCHER_NODE": node,
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_REGISTRY_TTL": "3",
        "RUCHER_LOG_FORMAT": "json",
        "RUCHER_COMPUTE_SHUTDOWN_TIMEOUT": "60",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "rucher.compute"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=(state / f"compute-{node}.log").open("wb"),
        start_new_session=True,
    )


async def wait_agent(bus: Bus, process: subprocess.Popen[bytes], node: str = NODE) -> None:
    """Return once the agent on ``node`` answers (it has reconciled by then)."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the compute agent exited with {process.returncode}")
        try:
            await bus.request(
                compute.GUEST_STATUS.to(node=node), compute.VmStatusQuery(vmid=999_999_998)
            )
        except RucherError as err:
            if err.code is ErrorCode.NOT_FOUND:
                return
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def stop_agent(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def task_end(bus: Bus, upid: str, timeout: float = 90.0) -> TaskState:
    """The task's record once it has stopped."""
    store = TaskStore(bus)
    ended: list[TaskState] = []

    async def stopped() -> bool:
        state = await store.get(upid)
        if state.status is TaskStatus.STOPPED:
            ended.append(state)
            return True
        return False

    await until(stopped, timeout=timeout, every=0.1)
    return ended[0]


def guest_config(image: GuestImage, **extra: str) -> dict[str, str]:
    """The test guest as a Proxmox config: direct kernel boot, serial console, vmbr0 NIC."""
    return {
        "name": "agent-test",
        "memory": "192",
        "serial0": "socket",
        "vga": "serial0",
        "net0": "virtio,bridge=vmbr0",
        "args": f"-kernel {image.kernel} -initrd {image.initrd} -append '{image.cmdline}'",
        **extra,
    }


def cleanup_domain(uri: str, vmid: int) -> None:
    """Remove a test domain that a failed test may have left behind."""
    connection = libvirt.open(uri)
    try:
        domain = connection.lookupByName(f"rucher-{vmid}")
    except libvirt.libvirtError:
        connection.close()
        return
    if domain.isActive():
        domain.destroy()
    domain.undefine()
    connection.close()


@pytest.fixture
def agent(nats_server, libvirtd, tmp_path) -> Iterator[subprocess.Popen[bytes]]:
    process = start_agent(nats_server.url, tmp_path / "state")
    yield process
    stop_agent(process)


@pytest.fixture
async def bus(nats_server, agent) -> AsyncIterator[Bus]:
    async with connected(nats_server.url, node=NODE) as connection:
        await wait_agent(connection, agent)
        yield connection


async def ask(bus: Bus, subject: compute.RpcSubject, message) -> str:  # type: ignore[name-defined]
    reply = await bus.request(subject.to(node=NODE), message, timeout=30)
    return reply.upid


def cmd(kind, vmid: int, **fields):
    return kind(command_id=new_id(), vmid=vmid, user=USER, **fields)


async def test_a_guest_is_created_booted_read_shut_down_and_destroyed(
    bus, guest_image, libvirtd, tmp_path
):
    vmid = 990_101
    cleanup_domain(libvirtd, vmid)
    upid = await ask(
        bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=guest_config(guest_image))
    )
    assert (await task_end(bus, upid)).exitstatus == "OK"
    record = await GuestRegistry(bus).get(vmid)
    assert record.node == NODE and record.lock is None
    assert record.config["net0"].startswith("virtio=BC:24:11:")
    try:
        upid = await ask(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        console = tmp_path / "state" / "console" / f"{vmid}-serial0.log"

        def booted() -> bool:
            return console.exists() and guest_image.banner in console.read_text(errors="replace")

        await until(booted, timeout=60, every=0.2)
        status = await bus.request(
            compute.GUEST_STATUS.to(node=NODE), compute.VmStatusQuery(vmid=vmid)
        )
        assert status.status is PowerState.RUNNING
        assert status.maxmem == 192 << 20
        assert status.uptime > 0
        assert status.pid is not None
        upid = await ask(bus, compute.GUEST_SHUTDOWN, cmd(compute.VmShutdown, vmid, timeout=60))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        assert "powering off" in console.read_text(errors="replace")
        upid = await ask(bus, compute.GUEST_DESTROY, cmd(compute.VmDestroy, vmid, purge=True))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        with pytest.raises(RucherError) as caught:
            await GuestRegistry(bus).get(vmid)
        assert caught.value.code is ErrorCode.NOT_FOUND
        connection = libvirt.open(libvirtd)
        assert f"rucher-{vmid}" not in [d.name() for d in connection.listAllDomains()]
        connection.close()
    finally:
        cleanup_domain(libvirtd, vmid)


async def test_a_definition_libvirt_refuses_undoes_the_create(bus, guest_image, libvirtd):
    vmid = 990_102
    config = guest_config(guest_image, machine="pc-i440fx-99.9")  # no such machine in QEMU
    upid = await ask(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
    ended = await task_end(bus, upid)
    assert ended.exitstatus != "OK"
    assert "machine" in ended.exitstatus
    with pytest.raises(RucherError) as caught:
        await GuestRegistry(bus).get(vmid)
    assert caught.value.code is ErrorCode.NOT_FOUND
    connection = libvirt.open(libvirtd)
    assert f"rucher-{vmid}" not in [d.name() for d in connection.listAllDomains()]
    connection.close()


async def test_bad_input_is_refused_naming_the_field_with_nothing_created(bus, guest_image):
    vmid = 990_103
    for extra, field in (
        ({"net0": "virtio,bridge=nosuchbridge0"}, "net0"),
        ({"memory": str(1 << 30)}, "memory"),
        ({"cores": "4096"}, "cores"),
        ({"bogus": "1"}, "bogus"),
    ):
        with pytest.raises(RucherError) as caught:
            await ask(
                bus,
                compute.GUEST_CREATE,
                cmd(compute.VmCreate, vmid, config=guest_config(guest_image, **extra)),
            )
        assert caught.value.code is ErrorCode.INVALID
        assert caught.value.details == {"field": field}
    with pytest.raises(RucherError):
        await GuestRegistry(bus).get(vmid)


async def test_reconciliation_removes_a_domain_nobody_owns(
    nats_server, libvirtd, guest_image, tmp_path
):
    vmid = 990_104
    cleanup_domain(libvirtd, vmid)
    connection = libvirt.open(libvirtd)
    connection.defineXML(
        f"<domain type='qemu'><name>rucher-{vmid}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    connection.close()
    process = start_agent(nats_server.url, tmp_path / "state")
    try:
        async with connected(nats_server.url, node=NODE) as bus:
            await wait_agent(bus, process)
        connection = libvirt.open(libvirtd)
        assert f"rucher-{vmid}" not in [d.name() for d in connection.listAllDomains()]
        connection.close()
    finally:
        stop_agent(process)
        cleanup_domain(libvirtd, vmid)
