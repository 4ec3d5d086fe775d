"""Snapshots, rollback, templates, clones, resize and pending changes over the fakes."""
# ruff: noqa: F811 - the world fixture imported from test_compute_service is a parameter here

from __future__ import annotations

import msgspec
import pytest

from rucher.bus import RucherError
from rucher.compute import clone, pending, snapshots
from rucher.compute.domain_xml import domain_name
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.compute import CloneFormat
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock

from .test_compute_service import World, command, create, world  # noqa: F401 - fixture

GIB = 1 << 30
DISK0 = "local:100/vm-100-disk-0.qcow2"
DISK1 = "local:100/vm-100-disk-1.qcow2"


class Pools:
    """IAM pools in a dict."""

    def __init__(self) -> None:
        self.members: dict[str, set[int]] = {"web": set()}

    async def exists(self, poolid: str) -> bool:
        return poolid in self.members

    async def join(self, poolid: str, vmid: int, actor: str) -> None:
        self.members[poolid].add(vmid)

    async def leave(self, vmid: int, actor: str) -> list[str]:
        left = [poolid for poolid, vms in self.members.items() if vmid in vms]
        for poolid in left:
            self.members[poolid].discard(vmid)
        return left


async def made(world: World, **config: str) -> None:
    await world.service.create(create(**config))
    assert world.tasks.ended[-1] == ("qmcreate", "OK")


async def run(world: World, operation, message) -> str:
    await operation(world.service, message)
    return world.tasks.ended[-1][1]


async def refused(world: World, operation, message) -> RucherError:
    with pytest.raises(RucherError) as caught:
        await operation(world.service, message)
    return caught.value


def snap(name: str, **fields) -> compute.VmSnapshotCreate:
    return command(compute.VmSnapshotCreate, snapname=name, **fields)


async def test_a_stopped_vm_is_snapshotted_by_the_storage_and_recorded_as_a_section(world):
    await made(world, scsi0="local:1,format=qcow2", scsi1="local:1,format=qcow2")
    assert await run(world, snapshots.create, snap("one", description="first")) == "OK"
    assert world.volumes.snapshots == {DISK0: {"one"}, DISK1: {"one"}}
    record = world.guests.records[100]
    assert record.lock is None
    assert record.config["parent"] == "one"
    section = record.snapshots["one"]
    assert section["description"] == "first" and section["scsi0"] == record.config["scsi0"]
    assert "parent" not in section and "vmstate" not in section
    assert await run(world, snapshots.create, snap("two")) == "OK"
    assert world.guests.records[100].snapshots["two"]["parent"] == "one"


async def test_bad_snapshot_names_and_disks_are_refused_naming_the_field(world):
    await made(world, scsi0="local:1")
    error = await refused(world, snapshots.create, snap("one"))
    assert error.code is ErrorCode.INVALID and error.details == {"field": "scsi0"}
    assert "snapshot feature is not available" in error.message
    error = await refused(world, snapshots.create, snap("current"))
    assert error.details == {"field": "snapname"}
    error = await refused(
        world, snapshots.rollback, command(compute.VmSnapshotRollback, snapname="nope")
    )
    assert error.details == {"field": "snapname"}
    assert world.guests.records[100].lock is None and world.guests.records[100].snapshots == {}


async def test_a_running_vm_snapshots_its_qcow2_disks_through_qemu_and_ram_only_on_qcow2(world):
    await made(world, scsi0="local:1,format=qcow2")
    await world.service.start(command(compute.VmStart))
    assert await run(world, snapshots.create, snap("live")) == "OK"
    assert world.hypervisor.calls[-1] == (
        "snapshot_disks",
        f"{domain_name(100)}:live:/srv/local/100/vm-100-disk-0.qcow2",
    )
    assert world.volumes.snapshots == {}  # QEMU holds the image: the storage is not asked
    assert await run(world, snapshots.create, snap("ram", vmstate=True)) == "OK"
    assert world.hypervisor.calls[-1] == ("save_vm", f"{domain_name(100)}:ram")
    assert world.guests.records[100].snapshots["ram"]["vmstate"] == "1"


async def test_vmstate_needs_qcow2_files(world):
    await made(world, scsi0="local:1,format=qcow2")
    world.volumes.volumes["local:100/vm-100-disk-1.raw"] = GIB
    world.guests.records[100].config["scsi1"] = "local:100/vm-100-disk-1.raw,size=1G"
    await world.service.start(command(compute.VmStart))
    error = await refused(world, snapshots.create, snap("ram", vmstate=True))
    assert error.details == {"field": "scsi1"}  # a raw file has no snapshots at all


async def test_a_failed_snapshot_removes_what_it_made_and_records_nothing(world):
    await made(world, scsi0="local:1,format=qcow2", scsi1="local:1,format=qcow2")
    world.volumes.refuse_snapshot = DISK1
    assert await run(world, snapshots.create, snap("one")) == "qemu-img: snapshot failed"
    assert world.volumes.snapshots == {DISK0: set(), DISK1: set()}
    record = world.guests.records[100]
    assert record.snapshots == {} and "parent" not in record.config and record.lock is None


async def test_rollback_restores_config_and_disks_and_keeps_newer_disks_unused(world):
    await made(world, scsi0="local:1,format=qcow2")
    assert await run(world, snapshots.create, snap("one")) == "OK"
    await world.service.update_config(
        command(compute.VmConfigUpdate, config={"scsi1": "local:1,format=qcow2", "cores": "2"})
    )
    assert world.tasks.ended[-1] == ("qmconfig", "OK")
    message = command(compute.VmSnapshotRollback, snapname="one")
    assert await run(world, snapshots.rollback, message) == "OK"
    assert ("rollback", f"{DISK0}@one") in world.volumes.calls
    record = world.guests.records[100]
    assert "scsi1" not in record.config and "cores" not in record.config
    assert record.config["unused0"] == DISK1 and record.config["parent"] == "one"
    assert record.lock is None
    assert world.hypervisor.domains_by_name[domain_name(100)].state is PowerState.STOPPED


async def test_rollback_to_a_ram_snapshot_restarts_the_vm_from_it(world):
    await made(world, scsi0="local:1,format=qcow2")
    await world.service.start(command(compute.VmStart))
    assert await run(world, snapshots.create, snap("ram", vmstate=True)) == "OK"
    world.volumes.snapshots[DISK0] = {"ram"}  # savevm wrote it into the image
    message = command(compute.VmSnapshotRollback, snapname="ram")
    assert await run(world, snapshots.rollback, message) == "OK"
    names = [call[0] for call in world.hypervisor.calls[-3:]]
    assert names == ["define", "start", "load_vm"]
    assert world.hypervisor.domains_by_name[domain_name(100)].state is PowerState.RUNNING


async def test_deleting_a_middle_snapshot_gives_its_children_its_parent(world):
    await made(world, scsi0="local:1,format=qcow2")
    for name in ("a", "b", "c"):
        assert await run(world, snapshots.create, snap(name)) == "OK"
    message = command(compute.VmSnapshotDelete, snapname="b")
    assert await run(world, snapshots.delete, message) == "OK"
    record = world.guests.records[100]
    assert set(record.snapshots) == {"a", "c"}
    assert record.snapshots["c"]["parent"] == "a" and record.config["parent"] == "c"
    assert world.volumes.snapshots[DISK0] == {"a", "c"}
    world.volumes.snapshots[DISK0].discard("a")
    message = command(compute.VmSnapshotDelete, snapname="a")
    assert await run(world, snapshots.delete, message) != "OK"
    assert "a" in world.guests.records[100].snapshots
    message = command(compute.VmSnapshotDelete, snapname="a", force=True)
    assert await run(world, snapshots.delete, message) == "OK"
    assert "parent" not in world.guests.records[100].snapshots["c"]


async def test_a_template_has_base_disks_and_refuses_to_start(world):
    await made(world, scsi0="local:1,format=qcow2")
    assert await run(world, clone.template, command(compute.VmTemplate)) == "OK"
    record = world.guests.records[100]
    assert record.config["template"] == "1"
    assert record.config["scsi0"].startswith("local:100/base-100-disk-0.qcow2,")
    error = await refused(world, clone.template, command(compute.VmTemplate))
    assert error.details == {"field": "vmid"}
    with pytest.raises(RucherError) as caught:
        await world.service.start(command(compute.VmStart))
    assert "template" in caught.value.message


async def test_a_template_clones_linked_by_default_and_full_on_request(world):
    world.service.pools = Pools()
    await made(world, scsi0="local:1,format=qcow2", net0="virtio=BC:24:11:00:00:01,bridge=vmbr0")
    assert await run(world, clone.template, command(compute.VmTemplate)) == "OK"
    message = command(compute.VmClone, newid=101, name="web1", pool="web")
    assert await run(world, clone.clone, message) == "OK"
    linked = world.guests.records[101]
    assert linked.lock is None and linked.config["name"] == "web1"
    assert linked.config["scsi0"].startswith("local:100/base-100-disk-0.qcow2/101/vm-101-disk-0")
    assert "BC:24:11:00:00:01" not in linked.config["net0"]
    assert "template" not in linked.config
    assert world.service.pools.members["web"] == {101}
    assert domain_name(101) in world.hypervisor.domains_by_name
    message = command(compute.VmClone, newid=102, full=True, format=CloneFormat.RAW)
    assert await run(world, clone.clone, message) == "OK"
    assert world.guests.records[102].config["scsi0"].startswith("local:102/vm-102-disk-0.raw")
    await world.service.destroy(command(compute.VmDestroy, 101))
    assert world.service.pools.members["web"] == set()


async def test_clone_refusals_name_the_field_and_a_failed_clone_leaves_nothing(world):
    await made(world, scsi0="local:1,format=qcow2", scsi1="local:1,format=qcow2")
    for fields, field in (
        ({"newid": 101, "full": False}, "full"),
        ({"newid": 100}, "newid"),
        ({"newid": 101, "pool": "nope"}, "pool"),
        ({"newid": 101, "snapname": "nope"}, "snapname"),
        ({"newid": 101, "target": "elsewhere"}, "target"),
    ):
        error = await refused(world, clone.clone, command(compute.VmClone, **fields))
        assert error.details == {"field": field}, fields
    world.volumes.refuse_clone = DISK1
    assert await run(world, clone.clone, command(compute.VmClone, newid=101)) == "copy failed"
    assert 101 not in world.guests.records
    assert not [volid for volid in world.volumes.volumes if "101" in volid]
    assert domain_name(101) not in world.hypervisor.domains_by_name
    assert world.guests.records[100].lock is None  # the source's clone lock is released
    world.volumes.refuse_clone = None
    assert await run(world, clone.clone, command(compute.VmClone, newid=101)) == "OK"
    assert world.guests.records[100].lock is None and world.guests.records[101].lock is None
    world.guests.records[100] = msgspec.structs.replace(
        world.guests.records[100], lock=GuestLock.BACKUP
    )
    error = await refused(world, clone.clone, command(compute.VmClone, newid=102))
    assert error.code is ErrorCode.LOCKED and 102 not in world.guests.records


async def test_resize_grows_by_the_storage_when_stopped_and_by_qemu_when_running(world):
    await made(world, scsi0="local:1,format=qcow2")
    message = command(compute.VmDiskResize, disk="scsi0", size=GIB, relative=True)
    assert await run(world, pending.resize, message) == "OK"
    assert world.volumes.volumes[DISK0] == 2 * GIB
    assert world.guests.records[100].config["scsi0"] == f"{DISK0},size=2G"
    error = await refused(
        world, pending.resize, command(compute.VmDiskResize, disk="scsi0", size=1)
    )
    assert error.details == {"field": "size"}
    error = await refused(
        world, pending.resize, command(compute.VmDiskResize, disk="scsi3", size=1)
    )
    assert error.details == {"field": "disk"}
    await world.service.start(command(compute.VmStart))
    message = command(compute.VmDiskResize, disk="scsi0", size=3 * GIB)
    assert await run(world, pending.resize, message) == "OK"
    path = "/srv/local/100/vm-100-disk-0.qcow2"
    assert world.hypervisor.calls[-1] == ("block_resize", f"{domain_name(100)}:{path}:{3 * GIB}")


async def test_a_running_vm_keeps_hardware_changes_pending_until_its_next_start(world):
    await made(world, scsi0="local:1,format=qcow2", hotplug="0")
    await world.service.start(command(compute.VmStart))
    update = command(
        compute.VmConfigUpdate,
        config={"memory": "512", "name": "renamed", "scsi1": "local:1,format=qcow2"},
        delete=("scsi0",),
    )
    await world.service.update_config(update)
    assert world.tasks.ended[-1] == ("qmconfig", "OK")
    record = world.guests.records[100]
    assert record.config["name"] == "renamed" and record.config["memory"] == "256"
    assert record.pending == {"memory": "512", "scsi1": f"{DISK1},size=1G"}
    assert record.pending_delete == ("scsi0",)
    await world.service.update_config(command(compute.VmConfigUpdate, revert=("memory",)))
    assert world.guests.records[100].pending == {"scsi1": f"{DISK1},size=1G"}
    await world.service.stop(command(compute.VmStop))
    await world.service.start(command(compute.VmStart))
    record = world.guests.records[100]
    assert record.pending == {} and record.pending_delete == ()
    assert record.config["scsi1"] == f"{DISK1},size=1G" and "scsi0" not in record.config
    assert record.config["unused0"] == DISK0 and record.config["memory"] == "256"


async def test_deleting_a_disk_keeps_it_unused_and_deleting_unused_frees_it(world):
    await made(world, scsi0="local:1,format=qcow2", scsi1="local:1,format=qcow2")
    await world.service.update_config(command(compute.VmConfigUpdate, delete=("scsi1",)))
    assert world.guests.records[100].config["unused0"] == DISK1
    assert DISK1 in world.volumes.volumes
    await world.service.update_config(command(compute.VmConfigUpdate, delete=("unused0",)))
    assert "unused0" not in world.guests.records[100].config
    assert DISK1 not in world.volumes.volumes
    await world.service.update_config(
        command(compute.VmConfigUpdate, delete=("scsi0",), force=True)
    )
    assert world.guests.records[100].config.get("unused0") is None
    assert DISK0 not in world.volumes.volumes
    error = await refused_update(world, delete=("scsi9",))
    assert error.details == {"field": "delete"}


async def refused_update(world: World, **fields) -> RucherError:
    with pytest.raises(RucherError) as caught:
        await world.service.update_config(command(compute.VmConfigUpdate, **fields))
    return caught.value


async def test_destroy_frees_snapshot_only_and_unreferenced_volumes(world):
    await made(world, scsi0="local:1,format=qcow2", scsi1="local:1,format=qcow2")
    assert await run(world, snapshots.create, snap("one")) == "OK"
    await world.service.update_config(
        command(compute.VmConfigUpdate, delete=("scsi1",), force=True)
    )
    assert DISK1 in world.volumes.volumes  # the snapshot still names it
    world.volumes.volumes["local:100/vm-100-disk-7.raw"] = GIB  # left over, named for 100
    await world.service.destroy(command(compute.VmDestroy, destroy_unreferenced_disks=True))
    assert world.tasks.ended[-1] == ("qmdestroy", "OK")
    assert not [volid for volid in world.volumes.volumes if "/100/" in volid]


async def test_a_running_vm_is_not_cloned_and_a_template_with_clones_is_not_destroyed(world):
    await made(world, scsi0="local:1,format=qcow2")
    await world.service.start(command(compute.VmStart))
    error = await refused(world, clone.clone, command(compute.VmClone, newid=101))
    assert error.details == {"field": "vmid"} and "running" in error.message
    await world.service.stop(command(compute.VmStop))
    assert await run(world, clone.template, command(compute.VmTemplate)) == "OK"
    assert await run(world, clone.clone, command(compute.VmClone, newid=101)) == "OK"
    with pytest.raises(RucherError) as caught:
        await world.service.destroy(command(compute.VmDestroy))
    assert "linked clone VM 101" in caught.value.message
    await world.service.destroy(command(compute.VmDestroy, 101))
    await world.service.destroy(command(compute.VmDestroy))
    assert world.guests.records == {} and world.tasks.ended[-1] == ("qmdestroy", "OK")


async def test_a_stopped_vm_takes_what_was_left_pending_on_its_next_config_change(world):
    await made(world, scsi0="local:1,format=qcow2")
    await world.service.start(command(compute.VmStart))
    await world.service.update_config(command(compute.VmConfigUpdate, config={"cores": "2"}))
    world.hypervisor.domains_by_name[domain_name(100)].state = PowerState.STOPPED  # powered off
    await world.service.update_config(command(compute.VmConfigUpdate, config={"memory": "384"}))
    record = world.guests.records[100]
    assert record.config["cores"] == "2" and record.config["memory"] == "384"
    assert record.pending == {}
    xml = world.hypervisor.domains_by_name[domain_name(100)].xml
    assert 'current="2"' in xml and '<memory unit="MiB">384</memory>' in xml


async def test_a_snapshot_description_is_changed_or_removed(world):
    await made(world, scsi0="local:1,format=qcow2")
    assert await run(world, snapshots.create, snap("one", description="old")) == "OK"
    message = command(compute.VmSnapshotUpdate, snapname="one", description="new")
    await snapshots.update(world.service, message)
    assert world.guests.records[100].snapshots["one"]["description"] == "new"
    await snapshots.update(world.service, command(compute.VmSnapshotUpdate, snapname="one"))
    assert "description" not in world.guests.records[100].snapshots["one"]
    error = await refused(
        world, snapshots.update, command(compute.VmSnapshotUpdate, snapname="two")
    )
    assert error.details == {"field": "snapname"}


async def test_new_disks_and_nics_are_hot_plugged_and_what_qemu_refuses_stays_pending(world):
    await made(world, scsi0="local:1,format=qcow2")
    await world.service.start(command(compute.VmStart))
    world.hypervisor.refuse_attach = "ua-virtio0"
    update = command(
        compute.VmConfigUpdate,
        config={
            "scsi1": "local:1,format=qcow2",
            "virtio0": "local:1,format=qcow2",
            "net1": "e1000,bridge=vmbr0",
            "memory": "512",
        },
    )
    await world.service.update_config(update)
    assert world.tasks.ended[-1] == ("qmconfig", "OK")
    record = world.guests.records[100]
    assert record.config["scsi1"] == f"{DISK1},size=1G"
    assert record.config["net1"].startswith("e1000=BC:24:11:")
    assert set(record.pending) == {"virtio0", "memory"}
    attached = [xml for call, xml in world.hypervisor.calls if call == "attach_device"]
    assert len(attached) == 2
    assert "ua-scsi1" in attached[1] and "<boot" not in attached[1]
    assert "ua-net1" in attached[0]
