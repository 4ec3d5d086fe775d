"""Acceptance: proxmoxer drives snapshots, pending changes, resize, templates and clones.

The real gateway, IAM, storage service and compute agent on the system libvirtd; the test guest
boots under TCG with a qcow2 disk from the ``local`` dir storage.
"""
# ruff: noqa: F811 - pytest fixtures imported from other modules are parameters here

from __future__ import annotations

import contextlib

import pytest
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

from .stack import NODE
from .test_qemu import agent, client, ok  # noqa: F401 - fixtures
from .test_qemu_helpers import next_vmid

pytest.importorskip("libvirt")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def bad(call, *args, **params) -> dict[str, str]:
    """The ``errors`` of a 400 answer."""
    with pytest.raises(ResourceException) as caught:
        call(*args, **params)
    assert caught.value.status_code == 400, caught.value
    return caught.value.errors or {}


def make_guest(api: ProxmoxAPI, image: GuestImage, vmid: int) -> None:
    ok(
        api,
        api.nodes(NODE).qemu.post(
            vmid=vmid,
            name="snap-vm",
            memory=192,
            serial0="socket",
            vga="serial0",
            net0="virtio,bridge=vmbr0",
            scsi0="local:1,format=qcow2",
            args=f"-kernel {image.kernel} -initrd {image.initrd} -append '{image.cmdline}'",
        ),
    )


def test_snapshots_pending_changes_and_resize_through_the_api(agent, guest_image):
    api = client(agent)
    vmid = next_vmid()
    make_guest(api, guest_image, vmid)
    vm = api.nodes(NODE).qemu(vmid)
    try:
        ok(api, vm.snapshot.post(snapname="clean", description="fresh"))
        listing = vm.snapshot.get()
        assert [entry["name"] for entry in listing] == ["clean", "current"]
        assert listing[0]["description"] == "fresh" and listing[0]["vmstate"] == 0
        assert listing[1]["parent"] == "clean" and listing[1]["running"] == 0
        assert vm.snapshot("clean").get() == [{"cmd": "rollback"}, {"cmd": "config"}]
        vm.snapshot("clean").config.put(description="renamed")
        section = vm.snapshot("clean").config.get()
        assert section["description"] == "renamed" and "snaptime" in section
        assert section["scsi0"].startswith(f"local:{vmid}/vm-{vmid}-disk-0.qcow2")
        assert "snapname" in bad(vm.snapshot.post, snapname="clean")
        assert "snapname" in bad(vm.snapshot("nothere").config.get)
        assert "snapshot" in bad(vm.config.get, snapshot="nothere")

        ok(api, vm.status.start.post())
        vm.config.put(memory=256, description="running")
        pending = {entry["key"]: entry for entry in vm.pending.get()}
        assert pending["memory"] == {"key": "memory", "value": "192", "pending": "256"}
        assert pending["description"] == {"key": "description", "value": "running"}
        assert vm.config.get()["memory"] == "256"
        assert vm.config.get(current=1)["memory"] == "192"

        assert "size" in bad(vm.resize.put, disk="scsi0", size="lots")
        assert "size" in bad(vm.resize.put, disk="scsi0", size="512M")
        assert "disk" in bad(vm.resize.put, disk="scsi5", size="+1G")
        ok(api, vm.resize.put(disk="scsi0", size="+1G"))
        assert vm.config.get()["scsi0"].endswith("size=2G")

        ok(api, vm.snapshot.post(snapname="withram", vmstate=1))
        assert vm.snapshot.get()[1]["vmstate"] == 1
        ok(api, vm.snapshot("withram").rollback.post())
        assert vm.status.current.get()["status"] == "running"

        ok(api, vm.status.stop.post())
        ok(api, vm.snapshot("clean").rollback.post(start=1))
        assert vm.status.current.get()["status"] == "running"
        assert vm.config.get()["scsi0"].endswith("size=1G")
        assert vm.pending.get()[0]["key"] != "memory" or "pending" not in vm.pending.get()[0]
        ok(api, vm.status.stop.post())
        ok(api, vm.snapshot("withram").delete())
        ok(api, vm.snapshot("clean").delete())
        assert [entry["name"] for entry in vm.snapshot.get()] == ["current"]
    finally:
        with contextlib.suppress(ResourceException):
            ok(api, vm.status.stop.post())
        ok(api, vm.delete(purge=1))


def test_a_template_is_cloned_linked_and_full_and_refuses_to_start(agent, guest_image):
    api = client(agent)
    vmid, linked, full = next_vmid(), next_vmid(), next_vmid()
    make_guest(api, guest_image, vmid)
    node = api.nodes(NODE)
    vm = node.qemu(vmid)
    made = [vmid]
    try:
        assert "full" in bad(vm.clone.post, newid=linked, full=0)
        assert "newid" in bad(vm.clone.post, newid=vmid)
        assert "pool" in bad(vm.clone.post, newid=linked, pool="nosuchpool")
        ok(api, vm.template.post())
        assert vm.config.get()["template"] == 1 or vm.config.get()["template"] == "1"
        with pytest.raises(ResourceException):
            vm.status.start.post()

        api.pools.post(poolid="clones")
        ok(api, vm.clone.post(newid=linked, name="linked-one", pool="clones"))
        made.append(linked)
        config = node.qemu(linked).config.get()
        assert config["name"] == "linked-one"
        assert config["scsi0"].startswith(f"local:{vmid}/base-{vmid}-disk-0.qcow2/{linked}/")
        assert linked in [member["vmid"] for member in api.pools("clones").get()["members"]]
        ok(api, node.qemu(linked).status.start.post())
        ok(api, node.qemu(linked).status.stop.post())

        ok(api, vm.clone.post(newid=full, full=1, format="raw", storage="local"))
        made.append(full)
        assert (
            node.qemu(full).config.get()["scsi0"].startswith(f"local:{full}/vm-{full}-disk-0.raw")
        )
        ok(api, node.qemu(linked).delete())
        made.remove(linked)
        assert api.pools("clones").get()["members"] == []
    finally:
        for each in reversed(made):
            ok(api, node.qemu(each).delete(**{"destroy-unreferenced-disks": 1}))
        with contextlib.suppress(ResourceException):
            api.pools("clones").delete()
