"""The compute agent with the real storage service: disks allocated, mapped, booted and freed.

One nats-server, the storage service (its ``local`` dir storage in a temporary folder), the
compute agent and the system libvirtd, each a real process; the test guest boots by direct
kernel boot with its new qcow2 disk attached.
"""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rucher.bus import Bus, RucherError
from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto import storage as s
from rucher.proto.errors import ErrorCode
from rucher.testing.libvirt import guest_image, libvirtd  # noqa: F401 - fixtures

from .buses import connected, until
from .storage_service import call, start_storage, stop_storage, wait_ready
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

pytestmark = pytest.mark.integration

GIB = 1 << 30


@pytest.fixture
def local(tmp_path) -> Path:
    return tmp_path / "local"


@pytest.fixture
def stack(nats_server, libvirtd, tmp_path, local) -> Iterator[tuple[str, Path]]:
    """The storage service and the compute agent of node ``cn1``, both real processes."""
    storage = start_storage(
        nats_server.url, tmp_path / "storage", node=NODE, RUCHER_STORAGE_LOCAL_PATH=str(local)
    )
    agent = start_agent(nats_server.url, tmp_path / "state")
    try:
        asyncio.run(wait_ready(nats_server.url, storage, node=NODE))
        yield nats_server.url, agent
    finally:
        stop_agent(agent)
        stop_storage(storage)


@pytest.fixture
async def bus(stack) -> AsyncIterator[Bus]:
    url, agent = stack
    async with connected(url, node=NODE) as connection:
        await wait_agent(connection, agent)
        yield connection


def virtual_size(path: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(json.loads(out)["virtual-size"])


def domain_names(uri: str) -> list[str]:
    connection = libvirt.open(uri)
    try:
        return [domain.name() for domain in connection.listAllDomains()]
    finally:
        connection.close()


async def test_a_new_disk_is_allocated_booted_with_and_freed_on_destroy(
    bus, guest_image, libvirtd, local, tmp_path
):
    vmid = 990_201
    cleanup_domain(libvirtd, vmid)
    config = guest_config(guest_image, scsi0="local:1,format=qcow2")
    upid = await ask(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
    assert (await task_end(bus, upid)).exitstatus == "OK"
    try:
        record = await GuestRegistry(bus).get(vmid)
        volid = f"local:{vmid}/vm-{vmid}-disk-0.qcow2"
        assert record.config["scsi0"] == f"{volid},size=1G"
        path = local / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2"
        assert virtual_size(path) == GIB
        info = await call(bus, s.VOLUME_INFO, node=NODE, volid=volid)
        assert info.volume.vmid == vmid and info.volume.size == GIB
        upid = await ask(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        console = tmp_path / "state" / "console" / f"{vmid}-serial0.log"

        def booted() -> bool:
            return console.exists() and guest_image.banner in console.read_text(errors="replace")

        await until(booted, timeout=60, every=0.2)
        connection = libvirt.open(libvirtd)
        xml = connection.lookupByName(f"rucher-{vmid}").XMLDesc()
        connection.close()
        assert str(path) in xml
        upid = await ask(bus, compute.GUEST_STOP, cmd(compute.VmStop, vmid))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        upid = await ask(bus, compute.GUEST_DESTROY, cmd(compute.VmDestroy, vmid, purge=True))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        assert not path.exists()
        with pytest.raises(RucherError) as caught:
            await GuestRegistry(bus).get(vmid)
        assert caught.value.code is ErrorCode.NOT_FOUND
        assert f"rucher-{vmid}" not in domain_names(libvirtd)
    finally:
        cleanup_domain(libvirtd, vmid)


async def test_a_refused_definition_frees_the_disk_it_allocated(bus, guest_image, libvirtd, local):
    vmid = 990_202
    config = guest_config(guest_image, scsi0="local:1", machine="pc-i440fx-99.9")
    upid = await ask(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
    ended = await task_end(bus, upid)
    assert "machine" in ended.exitstatus
    folder = local / "images" / str(vmid)
    assert not folder.exists() or list(folder.iterdir()) == []
    listing = await call(bus, s.CONTENT_LIST, node=NODE, storage="local", vmid=vmid)
    assert listing.volumes == ()
    with pytest.raises(RucherError) as caught:
        await GuestRegistry(bus).get(vmid)
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert f"rucher-{vmid}" not in domain_names(libvirtd)


async def test_an_unknown_volume_is_refused_naming_the_disk(bus, guest_image):
    vmid = 990_203
    config = guest_config(guest_image, scsi0="local:990203/vm-990203-disk-7.qcow2")
    with pytest.raises(RucherError) as caught:
        await ask(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details == {"field": "scsi0"}
