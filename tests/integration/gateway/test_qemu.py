"""Acceptance: proxmoxer drives a VM's life through the real gateway, IAM, compute and storage."""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import time

import pytest
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException
from proxmoxer.tools import Tasks

from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

from .stack import ADMIN, ADMIN_PASSWORD, NODE, Stack, logged_in
from .test_qemu_helpers import next_vmid, start_agent, wait_agent
from .test_storage_helpers import start_storage, wait_storage

pytest.importorskip("libvirt")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent(stack: Stack, libvirtd: str) -> Stack:
    """The compute agent on the system libvirtd and the storage service (``local`` in the
    module's folder), beside the module's gateway and IAM."""
    start_storage(stack, stack.root / "local")
    start_agent(stack, libvirtd, RUCHER_COMPUTE_SHUTDOWN_TIMEOUT="60")

    async def wait() -> None:
        admin = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
        try:
            await wait_storage(admin)
            await wait_agent(admin)
        finally:
            await admin.close()

    asyncio.run(wait())
    return stack


def client(stack: Stack) -> ProxmoxAPI:
    """proxmoxer against the test stack, logged in as the administrator."""
    return ProxmoxAPI(
        "127.0.0.1",
        port=stack.port,
        backend="https",
        verify_ssl=False,
        user=ADMIN,
        password=ADMIN_PASSWORD,
    )


def ok(api: ProxmoxAPI, upid: str) -> None:
    """Wait for the task with proxmoxer's own poller; it must end OK."""
    status = Tasks.blocking_status(api, upid, timeout=120, polling_interval=0.2)
    assert status is not None, upid
    assert status["exitstatus"] == "OK", status


def test_a_vm_is_created_started_read_snapshotted_shut_down_cloned_and_deleted(
    agent, guest_image: GuestImage
):
    api = client(agent)
    vmid = next_vmid()
    node = api.nodes(NODE)
    ok(
        api,
        node.qemu.post(
            vmid=vmid,
            name="proxmoxer-vm",
            memory=192,
            serial0="socket",
            vga="serial0",
            net0="virtio,bridge=vmbr0",
            scsi0="local:1,format=qcow2",
            args=f"-kernel {guest_image.kernel} -initrd {guest_image.initrd} "
            f"-append '{guest_image.cmdline}'",
        ),
    )
    config = node.qemu(vmid).config.get()
    assert config["name"] == "proxmoxer-vm"
    assert config["net0"].startswith("virtio=BC:24:11:")
    assert len(config["digest"]) == 40
    assert config["scsi0"] == f"local:{vmid}/vm-{vmid}-disk-0.qcow2,size=1G"
    disk = agent.root / "local" / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2"
    assert disk.exists()
    copy = next_vmid()
    copy_disk = agent.root / "local" / "images" / str(copy) / f"vm-{copy}-disk-0.qcow2"
    assert vmid in [vm["vmid"] for vm in node.qemu.get()]
    try:
        ok(api, node.qemu(vmid).status.start.post())
        current = node.qemu(vmid).status.current.get()
        assert current["status"] == "running"
        assert current["maxmem"] == 192 << 20
        assert current["name"] == "proxmoxer-vm"
        console = agent.root / "compute" / "console" / f"{vmid}-serial0.log"
        deadline = time.monotonic() + 60
        while guest_image.banner not in (console.read_text() if console.exists() else ""):
            assert time.monotonic() < deadline, "the guest did not boot"
            time.sleep(0.2)  # its init must be up to answer the ACPI power button
        ok(api, node.qemu(vmid).snapshot.post(snapname="booted", description="running"))
        snapshots = node.qemu(vmid).snapshot.get()
        assert [entry["name"] for entry in snapshots] == ["booted", "current"]
        ok(api, node.qemu(vmid).status.shutdown.post(timeout=60))
        assert node.qemu(vmid).status.current.get()["status"] == "stopped"
        ok(api, node.qemu(vmid).clone.post(newid=copy, full=1, name="proxmoxer-copy"))
        cloned = node.qemu(copy).config.get()
        assert cloned["name"] == "proxmoxer-copy"
        assert cloned["scsi0"].startswith(f"local:{copy}/vm-{copy}-disk-0.qcow2")
        assert cloned["net0"] != config["net0"]  # a clone gets a MAC of its own
        assert copy_disk.exists()
        assert node.qemu(copy).status.current.get()["status"] == "stopped"
    finally:
        if node.qemu(vmid).status.current.get()["status"] != "stopped":
            ok(api, node.qemu(vmid).status.stop.post())
        ok(api, node.qemu(vmid).delete(purge=1))
        if copy in [vm["vmid"] for vm in node.qemu.get()]:
            ok(api, node.qemu(copy).delete(purge=1))
    for gone in (vmid, copy):
        with pytest.raises(ResourceException) as caught:
            node.qemu(gone).config.get()
        assert caught.value.status_code == 404
    assert not disk.exists()
    assert not copy_disk.exists()


def test_bad_input_is_400_naming_the_field(agent):
    api = client(agent)
    for field, value in (
        ("net0", "virtio,bridge=nosuchbridge0"),
        ("hostpci0", "0000:01:00.0,colour=blue"),
        ("hostpci1", "not-a-pci-address"),
        ("hostpci2", "0000:01:00.0,mapping=gpu"),
    ):
        with pytest.raises(ResourceException) as caught:
            api.nodes(NODE).qemu.post(vmid=next_vmid(), **{field: value})
        assert caught.value.status_code == 400, (field, caught.value)
        assert field in caught.value.errors, (field, caught.value.errors)
