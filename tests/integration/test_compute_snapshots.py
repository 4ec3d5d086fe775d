"""Snapshots, rollback, resize, pending changes, templates and clones on real QEMU guests.

One nats-server, the storage service (its ``local`` dir storage in a temporary folder), the
compute agent and the system libvirtd, each a real process; the test guest boots under TCG by
direct kernel boot with qcow2 disks from the storage service.
"""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from rucher.bus import RucherError
from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto.errors import ErrorCode
from rucher.testing.libvirt import guest_image, libvirtd  # noqa: F401 - fixtures

from .buses import until
from .test_compute_agent import ask, cleanup_domain, cmd, guest_config, task_end
from .test_compute_storage import bus, local, stack  # noqa: F401 - fixtures

libvirt = pytest.importorskip("libvirt")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GIB = 1 << 30


def image_info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def snapshot_names(path: Path) -> list[str]:
    return [snap["name"] for snap in image_info(path).get("snapshots", [])]  # type: ignore[attr-defined]


async def ok(bus, subject, message) -> None:
    upid = await ask(bus, subject, message)
    ended = await task_end(bus, upid)
    assert ended.exitstatus == "OK", ended.exitstatus


async def refused(bus, subject, message) -> RucherError:
    with pytest.raises(RucherError) as caught:
        await ask(bus, subject, message)
    return caught.value


async def test_a_stopped_vm_snapshots_resizes_rolls_back_and_clones_from_its_template(
    bus, guest_image, libvirtd, local
):
    vmid, linked, full = 990_301, 990_302, 990_303
    for each in (vmid, linked, full):
        cleanup_domain(libvirtd, each)
    guests = GuestRegistry(bus)
    config = guest_config(guest_image, scsi0="local:1,format=qcow2")
    await ok(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
    disk0 = local / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2"
    try:
        await ok(
            bus,
            compute.SNAPSHOT_CREATE,
            cmd(compute.VmSnapshotCreate, vmid, snapname="first", description="clean"),
        )
        assert snapshot_names(disk0) == ["first"]
        record = await guests.get(vmid)
        assert record.config["parent"] == "first"
        assert record.snapshots["first"]["description"] == "clean"
        assert record.snapshots["first"]["scsi0"] == record.config["scsi0"]

        error = await refused(
            bus, compute.SNAPSHOT_CREATE, cmd(compute.VmSnapshotCreate, vmid, snapname="first")
        )
        assert error.code is ErrorCode.INVALID and error.details["field"] == "snapname"

        await ok(
            bus,
            compute.DISK_RESIZE,
            cmd(compute.VmDiskResize, vmid, disk="scsi0", size=GIB, relative=True),
        )
        assert image_info(disk0)["virtual-size"] == 2 * GIB
        assert (await guests.get(vmid)).config["scsi0"].endswith("size=2G")
        error = await refused(
            bus, compute.DISK_RESIZE, cmd(compute.VmDiskResize, vmid, disk="scsi0", size=GIB)
        )
        assert error.code is ErrorCode.INVALID and error.details["field"] == "size"

        await ok(
            bus,
            compute.GUEST_CONFIG_UPDATE,
            cmd(compute.VmConfigUpdate, vmid, config={"scsi1": "local:1,format=qcow2"}),
        )
        record = await guests.get(vmid)
        disk1_volid = f"local:{vmid}/vm-{vmid}-disk-1.qcow2"
        assert record.config["scsi1"] == f"{disk1_volid},size=1G"
        await ok(
            bus, compute.SNAPSHOT_CREATE, cmd(compute.VmSnapshotCreate, vmid, snapname="second")
        )
        assert (await guests.get(vmid)).snapshots["second"]["parent"] == "first"

        await ok(
            bus, compute.SNAPSHOT_ROLLBACK, cmd(compute.VmSnapshotRollback, vmid, snapname="first")
        )
        record = await guests.get(vmid)
        assert "scsi1" not in record.config
        assert record.config["unused0"] == disk1_volid
        assert record.config["parent"] == "first"
        # The disk is back to its size at the snapshot, as its config says.
        assert image_info(disk0)["virtual-size"] == GIB
        assert record.config["scsi0"].endswith("size=1G")

        await ok(
            bus, compute.SNAPSHOT_DELETE, cmd(compute.VmSnapshotDelete, vmid, snapname="second")
        )
        await ok(
            bus, compute.SNAPSHOT_DELETE, cmd(compute.VmSnapshotDelete, vmid, snapname="first")
        )
        assert snapshot_names(disk0) == []
        record = await guests.get(vmid)
        assert record.snapshots == {} and "parent" not in record.config

        await ok(
            bus, compute.GUEST_CONFIG_UPDATE, cmd(compute.VmConfigUpdate, vmid, delete=("unused0",))
        )
        assert not (local / "images" / str(vmid) / f"vm-{vmid}-disk-1.qcow2").exists()

        error = await refused(
            bus, compute.GUEST_CLONE, cmd(compute.VmClone, vmid, newid=linked, full=False)
        )
        assert error.code is ErrorCode.INVALID and error.details["field"] == "full"

        await ok(bus, compute.GUEST_TEMPLATE, cmd(compute.VmTemplate, vmid))
        record = await guests.get(vmid)
        assert record.config["template"] == "1"
        assert record.config["scsi0"].startswith(f"local:{vmid}/base-{vmid}-disk-0.qcow2")
        error = await refused(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
        assert error.code is ErrorCode.INVALID

        await ok(bus, compute.GUEST_CLONE, cmd(compute.VmClone, vmid, newid=linked, name="linked"))
        clone = await guests.get(linked)
        assert clone.lock is None and clone.config["name"] == "linked"
        assert clone.config["scsi0"].startswith(f"local:{vmid}/base-{vmid}-disk-0.qcow2/{linked}/")
        assert clone.config["net0"] != record.config["net0"]
        assert "template" not in clone.config

        await ok(
            bus,
            compute.GUEST_CLONE,
            cmd(compute.VmClone, vmid, newid=full, full=True, format="raw"),
        )
        copy = await guests.get(full)
        assert copy.config["scsi0"].startswith(f"local:{full}/vm-{full}-disk-0.raw")
        assert copy.config["name"] == "Copy-of-VM-agent-test"

        error = await refused(bus, compute.GUEST_CLONE, cmd(compute.VmClone, vmid, newid=full))
        assert error.code is ErrorCode.INVALID and error.details["field"] == "newid"
    finally:
        for each in (full, linked, vmid):
            with contextlib.suppress(RucherError):
                await ok(bus, compute.GUEST_DESTROY, cmd(compute.VmDestroy, each, purge=True))
            cleanup_domain(libvirtd, each)


async def test_a_running_vm_snapshots_with_its_ram_grows_a_disk_and_keeps_pending_changes(
    bus, guest_image, libvirtd, local, tmp_path
):
    vmid = 990_311
    cleanup_domain(libvirtd, vmid)
    guests = GuestRegistry(bus)
    config = guest_config(guest_image, scsi0="local:1,format=qcow2")
    await ok(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config, start=True))
    disk0 = local / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2"
    console = tmp_path / "state" / "console" / f"{vmid}-serial0.log"
    try:

        def booted() -> bool:
            return console.exists() and guest_image.banner in console.read_text(errors="replace")

        await until(booted, timeout=180, every=0.2)
        await ok(bus, compute.SNAPSHOT_CREATE, cmd(compute.VmSnapshotCreate, vmid, snapname="live"))
        await ok(
            bus,
            compute.SNAPSHOT_CREATE,
            cmd(compute.VmSnapshotCreate, vmid, snapname="ram", vmstate=True),
        )
        info = image_info(disk0)
        sizes = {snap["name"]: snap["vm-state-size"] for snap in info["snapshots"]}  # type: ignore[attr-defined]
        assert sizes["live"] == 0 and sizes["ram"] > 0
        assert (await guests.get(vmid)).snapshots["ram"]["vmstate"] == "1"

        await ok(
            bus, compute.DISK_RESIZE, cmd(compute.VmDiskResize, vmid, disk="scsi0", size=2 * GIB)
        )
        assert image_info(disk0)["virtual-size"] == 2 * GIB
        connection = libvirt.open(libvirtd)
        try:
            block = connection.lookupByName(f"rucher-{vmid}").blockInfo(str(disk0))
        finally:
            connection.close()
        assert block[0] == 2 * GIB  # the running QEMU sees the new size

        await ok(
            bus,
            compute.GUEST_CONFIG_UPDATE,
            cmd(
                compute.VmConfigUpdate,
                vmid,
                config={"memory": "256", "name": "renamed", "scsi1": "local:1,format=qcow2"},
            ),
        )
        record = await guests.get(vmid)
        assert record.config["name"] == "renamed" and record.config["memory"] == "192"
        assert record.pending == {"memory": "256"}
        disk1 = local / "images" / str(vmid) / f"vm-{vmid}-disk-1.qcow2"
        assert record.config["scsi1"].startswith(f"local:{vmid}/vm-{vmid}-disk-1.qcow2")
        connection = libvirt.open(libvirtd)
        try:
            live = connection.lookupByName(f"rucher-{vmid}").XMLDesc(0)
        finally:
            connection.close()
        assert str(disk1) in live  # hot-plugged into the running QEMU

        await ok(
            bus, compute.SNAPSHOT_ROLLBACK, cmd(compute.VmSnapshotRollback, vmid, snapname="ram")
        )
        status = await bus.request(
            compute.GUEST_STATUS.to(node="cn1"), compute.VmStatusQuery(vmid=vmid)
        )
        assert status.status.value == "running"
        record = await guests.get(vmid)
        assert record.config["parent"] == "ram" and record.pending == {}

        await ok(bus, compute.SNAPSHOT_DELETE, cmd(compute.VmSnapshotDelete, vmid, snapname="live"))
        assert "live" not in snapshot_names(disk0)
        await ok(bus, compute.GUEST_STOP, cmd(compute.VmStop, vmid))
    finally:
        with contextlib.suppress(RucherError):
            await ok(bus, compute.GUEST_STOP, cmd(compute.VmStop, vmid))
        with contextlib.suppress(RucherError):
            await ok(bus, compute.GUEST_DESTROY, cmd(compute.VmDestroy, vmid, purge=True))
        cleanup_domain(libvirtd, vmid)
