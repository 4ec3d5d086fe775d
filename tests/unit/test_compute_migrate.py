"""Migration logic between two nodes' agents over fakes: preconditions, live, offline, failures."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import msgspec
import pytest

from rucher.bus import RucherError
from rucher.compute.domain_xml import HostFacts, domain_name
from rucher.compute.drivers.fake import FakeHypervisor
from rucher.compute.migrate import Migrator, local_resources, target_storages
from rucher.compute.service import ComputeService
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestRecord
from rucher.proto.storage import DiskFormat, VolumeMapping, VolumeProtocol

from .test_compute_claims import RecordingClaims
from .test_compute_service import Events, FakeVolumes, InlineTasks, MemoryGuests

USER = "root@pam"
KEY = base64.b64encode(b"cephx-key-bytes!").decode()


class Registry(MemoryGuests):
    """The guest registry with ownership transfer."""

    async def transfer(
        self, vmid: int, *, from_node: str, to_node: str, token: int = 0
    ) -> GuestRecord:
        record = await self.get(vmid)
        if record.node != from_node:
            raise RucherError(ErrorCode.CONFLICT, f"VM {vmid} is on node {record.node}")
        self.records[vmid] = msgspec.structs.replace(record, node=to_node, owner_token=token)
        return self.records[vmid]


class SharedVolumes(FakeVolumes):
    """A ``local`` dir storage and a ``ceph`` RBD pool every node reaches."""

    async def map(self, volid: str) -> VolumeMapping:
        if not volid.startswith("ceph:"):
            return await super().map(volid)
        if volid not in self.volumes:
            raise RucherError(ErrorCode.NOT_FOUND, f"volume '{volid}' does not exist")
        image = f"rbd/{volid.partition(':')[2]}"
        return VolumeMapping(
            volid=volid,
            protocol=VolumeProtocol.RBD,
            path=image,
            format=DiskFormat.RAW,
            libvirt_source=f"<source protocol='rbd' name='{image}'/>",
            libvirt_disk=(
                "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
                "<auth username='admin'><secret type='ceph' usage='rucher-ceph-ceph'/></auth>"
                f"<source protocol='rbd' name='{image}'><host name='10.0.0.1'/></source></disk>"
            ),
            username="admin",
            secret=KEY,
            secret_usage="rucher-ceph-ceph",
        )


class Peers:
    """Routes prepare and finish to the other node's migrator, as the bus would."""

    def __init__(self) -> None:
        self.migrators: dict[str, Migrator] = {}
        self.available: dict[str, set[str] | None] = {}

    async def storages(self, node: str) -> set[str] | None:
        return self.available.get(node, {"local", "ceph"})

    async def nodes(self) -> set[str]:
        return set(self.migrators)

    async def prepare(self, node: str, command: compute.VmMigratePrepare) -> compute.VmMigrateReady:
        return await self.migrators[node].prepare(command)

    async def finish(self, node: str, command: compute.VmMigrateFinish) -> None:
        await self.migrators[node].finish(command)

    async def abort(self, node: str, command: compute.VmMigrateAbort) -> None:
        await self.migrators[node].abort(command)


@dataclass
class Node:
    hypervisor: FakeHypervisor
    tasks: InlineTasks
    events: Events
    service: ComputeService
    migrator: Migrator
    claims: RecordingClaims


@dataclass
class Pair:
    guests: Registry
    volumes: SharedVolumes
    nodes: dict[str, Node]
    peers: Peers

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


@pytest.fixture
def pair() -> Pair:
    guests, volumes, peers = Registry(), SharedVolumes(("local", "ceph")), Peers()
    nodes: dict[str, Node] = {}
    for name in ("n1", "n2"):
        hypervisor, tasks, events, claims = (
            FakeHypervisor(),
            InlineTasks(),
            Events(),
            RecordingClaims(),
        )
        service = ComputeService(
            hypervisor,
            guests,
            tasks,
            events,
            volumes=volumes,
            node=name,
            facts=HostFacts(),
            claim_client=claims,
        )
        migrator = Migrator(
            service,
            guests,
            peers,
            migration_address=f"10.0.0.{name[1:]}",
            peer_uri=f"qemu+tcp://{name}/system",
        )
        peers.migrators[name] = migrator
        nodes[name] = Node(hypervisor, tasks, events, service, migrator, claims)
    nodes["n1"].hypervisor.peers = {"qemu+tcp://n2/system": nodes["n2"].hypervisor}
    return Pair(guests, volumes, nodes, peers)


async def make_guest(pair: Pair, vmid: int, *, running: bool, **config: str) -> None:
    """Create a guest on n1; ``+key`` entries are written to its document afterwards (devices
    this agent cannot define yet, such as passthrough, still count against a migration)."""
    later = {key[1:]: value for key, value in config.items() if key.startswith("+")}
    config = {"memory": "256", "net0": "virtio,bridge=vmbr0", **config}
    config = {key: value for key, value in config.items() if not key.startswith("+")}
    await pair["n1"].service.create(
        compute.VmCreate(command_id="c", vmid=vmid, user=USER, config=config, start=running)
    )
    assert pair["n1"].tasks.ended[-1] == ("qmcreate", "OK")
    if later:
        await pair.guests.update(vmid, changes=later)


def migrate(vmid: int, target: str = "n2", **options: object) -> compute.VmMigrate:
    return compute.VmMigrate(command_id="m", vmid=vmid, user=USER, target=target, **options)


async def test_a_running_guest_on_rbd_moves_live_and_changes_owner_only_then(pair):
    await make_guest(pair, 100, running=True, scsi0="ceph:1")
    name = domain_name(100)
    assert pair["n1"].hypervisor.secrets == {"rucher-ceph-ceph": b"cephx-key-bytes!"}

    await pair["n1"].migrator.migrate(migrate(100, online=True))

    assert pair["n1"].tasks.ended[-1] == ("qmigrate", "OK")
    record = pair.guests.records[100]
    assert (record.node, record.lock) == ("n2", None)
    assert name not in pair["n1"].hypervisor.domains_by_name
    assert pair["n2"].hypervisor.domains_by_name[name].state is PowerState.RUNNING
    # The target mapped the disk itself, so its libvirtd holds the cephx secret too.
    assert pair["n2"].hypervisor.secrets == {"rucher-ceph-ceph": b"cephx-key-bytes!"}
    migrated = [e for e in pair["n1"].events.published if isinstance(e, compute.VmMigrated)]
    assert migrated and migrated[0].target == "n2" and migrated[0].online

    # The guest never stopped: n1 says nothing of its state after the move, n2 says it runs.
    def states(node: str) -> list[PowerState]:
        events = pair[node].events.published
        return [e.state for e in events if isinstance(e, compute.VmStateChanged)]

    assert states("n1") == [PowerState.STOPPED, PowerState.RUNNING]  # its create and start
    assert states("n2") == [PowerState.RUNNING]


async def test_a_failed_live_migration_leaves_the_guest_running_where_it_was(pair):
    await make_guest(pair, 101, running=True, scsi0="ceph:1")
    pair["n1"].hypervisor.refuse_migrate = "operation failed: migration job: unexpectedly failed"

    await pair["n1"].migrator.migrate(migrate(101, online=True))

    assert pair["n1"].tasks.ended[-1] == (
        "qmigrate",
        "libvirt: operation failed: migration job: unexpectedly failed",
    )
    record = pair.guests.records[101]
    assert (record.node, record.lock) == ("n1", None)
    assert pair["n1"].hypervisor.domains_by_name[domain_name(101)].state is PowerState.RUNNING
    assert pair["n2"].hypervisor.domains_by_name == {}


async def test_a_stopped_guest_moves_by_its_definition(pair):
    await make_guest(pair, 102, running=False, scsi0="ceph:1")

    await pair["n1"].migrator.migrate(migrate(102))

    assert pair["n1"].tasks.ended[-1] == ("qmigrate", "OK")
    assert pair.guests.records[102].node == "n2"
    assert pair["n1"].hypervisor.domains_by_name == {}
    assert pair["n2"].hypervisor.domains_by_name[domain_name(102)].state is PowerState.STOPPED
    assert not any(call[0] == "migrate" for call in pair["n1"].hypervisor.calls)


@pytest.mark.parametrize(
    ("running", "config", "options", "field", "words"),
    [
        (False, {}, {"target": "n9"}, "target", "no such cluster node 'n9'"),
        (False, {}, {"target": "n1"}, "target", "target is local node"),
        (True, {"scsi0": "ceph:1"}, {}, "online", "without --online"),
        (False, {"scsi0": "local:1"}, {}, "with-local-disks", "local:100/vm-100-disk-0.raw"),
        (False, {"scsi0": "ceph:1", "+hostpci0": "0000:01:00.0"}, {}, "force", "hostpci0"),
    ],
)
async def test_a_refused_migration_names_its_reason_and_changes_nothing(
    pair, running, config, options, field, words
):
    await make_guest(pair, 100, running=running, **config)
    before = pair.guests.records[100]
    with pytest.raises(RucherError) as caught:
        await pair["n1"].migrator.migrate(migrate(100, **options))
    assert caught.value.details.get("field") == field
    assert words in caught.value.message
    assert pair.guests.records[100] == before
    assert pair["n2"].hypervisor.domains_by_name == {}
    assert not any(task == "qmigrate" for task, _ in pair["n1"].tasks.ended)


async def test_a_stopped_guests_local_disks_cross_over_paused_and_it_stays_stopped(pair):
    await make_guest(pair, 100, running=False, scsi0="local:1")

    await pair["n1"].migrator.migrate(migrate(100, with_local_disks=True))

    assert pair["n1"].tasks.ended[-1] == ("qmigrate", "OK")
    assert ("start_paused", domain_name(100)) in pair["n1"].hypervisor.calls
    assert pair.guests.records[100].node == "n2"
    assert pair.guests.records[100].config["scsi0"].startswith("local:100/vm-100-disk-1.raw")
    assert pair["n1"].hypervisor.domains_by_name == {}
    assert pair["n2"].hypervisor.domains_by_name[domain_name(100)].state is PowerState.STOPPED


async def test_a_failed_offline_copy_stops_the_paused_guest_again(pair):
    await make_guest(pair, 100, running=False, scsi0="local:1")
    pair["n1"].hypervisor.refuse_migrate = "NBD: connection refused"

    await pair["n1"].migrator.migrate(migrate(100, with_local_disks=True))

    assert "connection refused" in pair["n1"].tasks.ended[-1][1]
    assert pair.guests.records[100].node == "n1"
    assert pair["n1"].hypervisor.domains_by_name[domain_name(100)].state is PowerState.STOPPED
    assert [v for v in pair.volumes.volumes if "100" in v] == ["local:100/vm-100-disk-0.raw"]


async def test_a_live_migration_copies_local_disks_to_new_volumes_on_the_target(pair):
    await make_guest(pair, 104, running=True, scsi0="local:1,format=qcow2", scsi1="ceph:1")
    old = "local:104/vm-104-disk-0.qcow2"
    assert pair.guests.records[104].config["scsi0"].startswith(old)

    await pair["n1"].migrator.migrate(migrate(104, online=True, with_local_disks=True))

    assert pair["n1"].tasks.ended[-1] == ("qmigrate", "OK")
    record = pair.guests.records[104]
    # Both nodes share the fake storage here, so the target's twin got the next free name.
    new = "local:104/vm-104-disk-1.qcow2"
    assert record.node == "n2" and record.config["scsi0"] == f"{new},size=1G"
    assert record.config["scsi1"].startswith("ceph:")
    assert ("copy_disks", "/srv/local/104/vm-104-disk-0.qcow2") in pair["n1"].hypervisor.calls
    assert old not in pair.volumes.volumes and new in pair.volumes.volumes
    assert new.replace(":", "/") in pair["n2"].hypervisor.domains_by_name[domain_name(104)].xml


async def test_a_failed_copy_frees_the_targets_new_volumes_and_keeps_the_guest(pair):
    await make_guest(pair, 105, running=True, scsi0="local:1,format=qcow2")
    pair["n1"].hypervisor.refuse_migrate = "operation failed: NBD: mirror failed"
    before = pair.guests.records[105]

    await pair["n1"].migrator.migrate(migrate(105, online=True, with_local_disks=True))

    assert pair["n1"].tasks.ended[-1][0] == "qmigrate"
    assert "mirror failed" in pair["n1"].tasks.ended[-1][1]
    assert pair.guests.records[105].config == before.config
    assert pair.guests.records[105].node == "n1"
    assert sorted(v for v in pair.volumes.volumes if "105" in v) == [
        "local:105/vm-105-disk-0.qcow2"
    ]
    assert pair["n2"].hypervisor.domains_by_name == {}


def test_targetstorage_maps_storages_like_proxmox():
    assert target_storages(None) == {} and target_storages("1") == {}
    assert target_storages("fast") == {"": "fast"}
    assert target_storages("local:fast,ceph:ceph2") == {"local": "fast", "ceph": "ceph2"}


async def test_a_target_without_the_guests_bridge_refuses_and_the_guest_stays(pair):
    await make_guest(pair, 103, running=True, scsi0="ceph:1")
    pair["n2"].hypervisor.host_bridges = frozenset({"vmbr1"})

    await pair["n1"].migrator.migrate(migrate(103, online=True))

    task, status = pair["n1"].tasks.ended[-1]
    assert task == "qmigrate" and "vmbr0" in status
    record = pair.guests.records[103]
    assert (record.node, record.lock) == ("n1", None)
    assert pair["n1"].hypervisor.domains_by_name[domain_name(103)].state is PowerState.RUNNING


async def test_a_locked_guest_is_not_migrated(pair):
    await make_guest(pair, 100, running=False, scsi0="ceph:1")
    await pair.guests.set_lock(100, GuestLock.BACKUP)
    with pytest.raises(RucherError) as caught:
        await pair["n1"].migrator.migrate(migrate(100))
    assert caught.value.code is ErrorCode.LOCKED


async def test_the_precondition_check_reports_state_nodes_disks_and_devices(pair):
    await make_guest(
        pair, 100, running=True, scsi0="ceph:1", scsi1="local:2", **{"+usb0": "host=1234:5678"}
    )
    report = await pair["n1"].migrator.check(compute.VmMigrateCheck(vmid=100, target="n7"))
    assert report.running
    assert report.allowed_nodes == ("n2",)
    assert "n7" in report.not_allowed_nodes
    assert [(d.volid, d.size, d.cdrom) for d in report.local_disks] == [
        ("local:100/vm-100-disk-0.raw", 2 << 30, False)
    ]
    assert report.local_resources == ("usb0",)


async def test_prepare_refuses_a_guest_not_being_migrated_from_the_source(pair):
    await make_guest(pair, 100, running=False, scsi0="ceph:1")
    prepare = compute.VmMigratePrepare(command_id="p", vmid=100, user=USER, source="n1")
    with pytest.raises(RucherError) as caught:
        await pair["n2"].migrator.prepare(prepare)
    assert caught.value.code is ErrorCode.CONFLICT


def test_local_resources_are_passthrough_devices_and_host_serial_ports():
    config = {"hostpci0": "x", "usb1": "y", "serial0": "/dev/ttyS0", "serial1": "socket"}
    assert local_resources(config) == ("hostpci0", "serial0", "usb1")


async def test_a_target_without_the_guests_storage_is_not_allowed(pair):
    await make_guest(pair, 100, running=False, scsi0="ceph:1")
    pair.peers.available["n2"] = {"local"}
    report = await pair["n1"].migrator.check(compute.VmMigrateCheck(vmid=100))
    assert report.allowed_nodes == ()
    assert report.unavailable_storages == {"n2": ("ceph",)}
    assert report.not_allowed_nodes["n2"] == "storage 'ceph' is not available on node 'n2'"
    with pytest.raises(RucherError) as caught:
        await pair["n1"].migrator.migrate(migrate(100))
    assert caught.value.details == {"field": "target"}
    assert "storage 'ceph' is not available on node 'n2'" in caught.value.message
    pair.peers.available["n2"] = None
    report = await pair["n1"].migrator.check(compute.VmMigrateCheck(vmid=100))
    assert "does not answer" in report.not_allowed_nodes["n2"]


async def test_the_schedulers_claim_is_confirmed_on_the_target_and_the_source_gives_its_back(pair):
    await make_guest(pair, 100, running=True, scsi0="ceph:1")
    command = migrate(100, online=True, claim_id="claim-7", claim_token=3)

    await pair["n1"].migrator.migrate(command)

    assert pair["n2"].claims.calls == [("confirm", "claim-7", "3", "100")]
    assert pair["n1"].claims.calls == [("release_guest", "100", "guest migrated away")]


async def test_a_failed_migration_gives_the_targets_claim_back(pair):
    await make_guest(pair, 100, running=True, scsi0="ceph:1")
    pair["n1"].hypervisor.refuse_migrate = "operation failed"

    await pair["n1"].migrator.migrate(migrate(100, online=True, claim_id="claim-8"))

    assert pair["n2"].claims.calls == [("release", "claim-8", "100", "migration failed")]
    assert pair["n1"].claims.calls == []
