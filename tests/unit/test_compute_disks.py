"""Disk values as storage volumes: sizes written as Proxmox writes them, owners, new disks."""

from __future__ import annotations

import pytest

from rucher.compute import disks


@pytest.mark.parametrize(
    ("size", "text"),
    [(1 << 30, "1G"), (512 << 20, "512M"), (1536 << 20, "1536M"), (4 << 40, "4T"), (1000, "1000"),
     (3 << 10, "3K"), (0, "0")],
)  # fmt: skip
def test_sizes_are_written_in_the_largest_exact_unit(size, text):
    assert disks.format_size(size) == text


@pytest.mark.parametrize(
    ("volid", "vmid"),
    [
        ("local:100/vm-100-disk-0.qcow2", 100),
        ("ceph:vm-101-disk-1", 101),
        ("ceph:base-102-disk-0", 102),
        ("local:150/base-150-disk-0.qcow2/151/vm-151-disk-0.qcow2", 151),
        ("local:iso/vm-100-disk-0.iso", None),
        ("local:iso/debian.iso", None),
    ],
)
def test_the_owner_is_read_from_the_volume_name(volid, vmid):
    assert disks.owner(volid) == vmid


def test_new_disks_volumes_and_owned_volumes_are_told_apart():
    config = {
        "scsi0": "local:4,cache=none",
        "virtio0": "file=local:0.5",
        "scsi1": "local:100/vm-100-disk-3.raw,size=1G",
        "ide2": "local:iso/x.iso,media=cdrom",
        "ide3": "none,media=cdrom",
        "sata0": "/dev/sdb",
        "unused0": "local:100/vm-100-disk-4.raw",
        "unused1": "local:200/vm-200-disk-0.raw",
        "memory": "512",
    }
    assert disks.requested(config) == [
        disks.DiskRequest(key="scsi0", storage="local", size=4 << 30),
        disks.DiskRequest(key="virtio0", storage="local", size=512 << 20),
    ]
    assert disks.volume_ids(config) == {
        "ide2": "local:iso/x.iso",
        "scsi1": "local:100/vm-100-disk-3.raw",
    }
    assert disks.owned_volumes(config, 100) == [
        "local:100/vm-100-disk-3.raw",
        "local:100/vm-100-disk-4.raw",
    ]


def test_an_allocated_disk_keeps_its_options_and_gets_its_size():
    assert (
        disks.recorded(
            "local:4,ssd=1,format=qcow2,cache=none,size=9G",
            "local:100/vm-100-disk-0.qcow2",
            4 << 30,
        )
        == "local:100/vm-100-disk-0.qcow2,cache=none,size=4G,ssd=1"
    )
