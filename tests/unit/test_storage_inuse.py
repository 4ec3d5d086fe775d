"""A volume a running guest has attached is not freed, grown, rolled back, renamed or based."""

from __future__ import annotations

from rucher.proto.errors import ErrorCode
from rucher.proto.storage import (
    DiskFormat,
    VolumeCreateBase,
    VolumeFree,
    VolumeRename,
    VolumeResize,
    VolumeSnapshotCreate,
    VolumeSnapshotRollback,
)
from rucher.storage.inuse import attached_volumes

from .test_storage_service import GIB, allocate, cid, refused, world  # noqa: F401


def test_attached_volumes_are_the_disks_a_config_names_not_unused_ones_or_paths():
    config = {
        "scsi0": "local:100/vm-100-disk-0.qcow2,size=4G",
        "virtio1": "file=ceph:vm-100-disk-1,cache=none",
        "ide2": "local:iso/debian.iso,media=cdrom",
        "ide3": "none,media=cdrom",
        "sata0": "/dev/sdb,size=1G",
        "efidisk0": "local:100/vm-100-disk-2.raw,efitype=4m",
        "unused0": "local:100/vm-100-disk-9.qcow2",
        "rootfs": "ceph:vm-100-disk-3,size=8G",
        "mp0": "volume=local:100/vm-100-disk-4.raw,mp=/data",
        "description": "local:100/vm-100-disk-5.raw",
        "net0": "virtio,bridge=vmbr0",
    }
    assert attached_volumes(config) == {
        "local:100/vm-100-disk-0.qcow2",
        "ceph:vm-100-disk-1",
        "local:iso/debian.iso",
        "local:100/vm-100-disk-2.raw",
        "ceph:vm-100-disk-3",
        "local:100/vm-100-disk-4.raw",
    }


async def test_a_running_guest_s_volume_is_refused_every_change_and_named(world):  # noqa: F811
    volume = await allocate(world, format=DiskFormat.QCOW2)
    volid = volume.volid
    await world.service.snapshot_create(
        VolumeSnapshotCreate(command_id=cid(), volid=volid, snapname="s1")
    )
    world.guests.configs[100] = {"scsi0": f"{volid},size=1G"}
    world.guests.running.add(100)
    before = dict(world.drivers["local"].volumes)

    changes = [
        world.service.free(VolumeFree(command_id=cid(), volid=volid)),
        world.service.resize(VolumeResize(command_id=cid(), volid=volid, size=2 * GIB)),
        world.service.snapshot_rollback(
            VolumeSnapshotRollback(command_id=cid(), volid=volid, snapname="s1")
        ),
        world.service.rename(VolumeRename(command_id=cid(), volid=volid, vmid=101)),
        world.service.create_base(VolumeCreateBase(command_id=cid(), volid=volid)),
    ]
    for change in changes:
        error = await refused(change, ErrorCode.INVALID, "volid")
        assert error.message == f"volume '{volid}' is in use by running guest 100: stop it first"
        assert error.details["vmids"] == [100]
    assert world.drivers["local"].volumes == before

    # The same disk, its guest stopped: every change goes through again.
    world.guests.running.clear()
    resized = await world.service.resize(VolumeResize(command_id=cid(), volid=volid, size=2 * GIB))
    assert resized.volume.size == 2 * GIB
    await world.service.free(VolumeFree(command_id=cid(), volid=volid))
    assert world.drivers["local"].volumes == {}


async def test_a_name_a_running_guest_still_uses_is_not_allocated_again(world):  # noqa: F811
    world.guests.configs[100] = {"virtio0": "local:100/vm-100-disk-3.raw"}
    world.guests.running.add(100)

    error = await refused(allocate(world, filename="vm-100-disk-3.raw"), ErrorCode.INVALID, "volid")
    assert "running guest 100" in error.message
    assert world.drivers["local"].volumes == {}
    assert (await allocate(world, filename="vm-100-disk-4.raw")).volid.endswith("disk-4.raw")


async def test_a_detached_or_foreign_volume_is_not_in_use(world):  # noqa: F811
    volume = await allocate(world)
    world.guests.configs[100] = {"unused0": volume.volid}
    world.guests.configs[101] = {"scsi0": "local:101/vm-101-disk-0.raw"}
    world.guests.running.update({100, 101})

    await world.service.free(VolumeFree(command_id=cid(), volid=volume.volid))
    assert world.drivers["local"].volumes == {}
