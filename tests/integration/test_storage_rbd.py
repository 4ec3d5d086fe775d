"""The single-node Ceph behind ``ops/ceph`` and the ``rbd`` storage built on it."""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import time

import pytest

from rucher.bus import RucherError
from rucher.proto import storage as s
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import ContentType, DiskFormat, StorageDefinition, StorageType
from rucher.testing.nats import NatsServer

from .buses import connected
from .storage_service import call, refused, start_storage, stop_storage, wait_ready

pytest_plugins = ["rucher.testing.ceph"]  # the session's one Ceph: the ceph_cluster fixture
pytestmark = pytest.mark.integration


def connect(settings: dict[str, str], user: str = "admin"):
    rados = importlib.import_module("rados")
    cluster = rados.Rados(rados_id=user, conffile=None, conf=settings)
    cluster.connect(timeout=10)
    return cluster


def test_the_cluster_stores_objects_for_a_client_holding_only_the_monitor_and_key(ceph_cluster):
    cluster = connect(ceph_cluster.client_settings())
    try:
        with cluster.open_ioctx(ceph_cluster.pool) as ioctx:
            ioctx.write_full("probe", b"rucher")
            assert ioctx.read("probe") == b"rucher"
            ioctx.remove_object("probe")
        _, out, _ = cluster.mon_command(
            json.dumps({"prefix": "osd pool get", "pool": "rbd", "var": "size", "format": "json"}),
            b"",
        )
        assert json.loads(out)["size"] == 1
    finally:
        cluster.shutdown()


def test_cephx_refuses_a_wrong_key(ceph_cluster):
    rados = importlib.import_module("rados")
    forged = {
        **ceph_cluster.client_settings(),
        "key": "AQBvaHNl" + "A" * 30 + "==",
        "client_mount_timeout": "3",
    }
    with pytest.raises((rados.PermissionDeniedError, rados.Error)):
        connect(forged)


@pytest.mark.slow
def test_a_cluster_starts_from_an_empty_folder_in_seconds_and_stops_osd_first(tmp_path):
    from rucher.testing.ceph import CephCluster, ceph_unavailable

    reason = ceph_unavailable()
    if reason is not None:
        pytest.skip(f"Ceph unavailable: {reason}")
    cluster = CephCluster(tmp_path / "ceph")
    started = time.monotonic()
    cluster.start()
    try:
        assert time.monotonic() - started < 30
        assert cluster.running
        again = CephCluster.load(tmp_path / "ceph")
        assert again.running and again.monhost == cluster.monhost
    finally:
        stopping = time.monotonic()
        cluster.stop()
    assert time.monotonic() - stopping < 5  # the OSD went first, so nothing stalled
    assert not any(process.alive for process in cluster.processes.values())


# The rbd storage through the storage service ------------------------------------------------

GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture(scope="module")
def rbd_stack(ceph_cluster, tmp_path_factory):
    """A nats-server and a storage service (node n1) with the session's Ceph as storage ``ceph``."""
    root = tmp_path_factory.mktemp("storage-rbd")
    server = NatsServer(name="nats-rbd", store_dir=root / "store")
    server.start()
    server.wait_ready()
    process = start_storage(server.url, root / "state",
                            RUCHER_STORAGE_LOCAL_PATH=str(root / "local"))  # fmt: skip
    try:
        asyncio.run(wait_ready(server.url, process))

        async def define() -> None:
            async with connected(server.url, service="setup") as bus:
                await call(bus, s.DEFINITION_CREATE, definition=StorageDefinition(
                    storage="ceph", storage_type=StorageType.RBD,
                    content=(ContentType.IMAGES, ContentType.ROOTDIR),
                    monhost=(ceph_cluster.monhost,), pool=ceph_cluster.pool),
                    keyring=ceph_cluster.admin_keyring.read_text())  # fmt: skip

        asyncio.run(define())
        yield server.url, root
    finally:
        stop_storage(process)
        server.stop()


@pytest.fixture
async def bus(rbd_stack):
    async with connected(rbd_stack[0], service="test-client") as client:
        yield client


@pytest.fixture
def ioctx(ceph_cluster):
    cluster = connect(ceph_cluster.client_settings())
    ctx = cluster.open_ioctx(ceph_cluster.pool)
    yield ctx
    ctx.close()
    cluster.shutdown()


def qemu_io_read(path, command: str) -> str:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def image(ioctx, name: str, snapshot: str | None = None):
    return importlib.import_module("rbd").Image(ioctx, name, snapshot=snapshot)


async def allocate(bus, vmid: int, **fields):
    fields.setdefault("size", 64 * MIB)
    return (await call(bus, s.VOLUME_ALLOCATE, storage="ceph", vmid=vmid, **fields)).volume


async def test_rbd_status_is_the_pool_s_usage_from_the_cluster(bus):
    status = (await call(bus, s.STATUS, storage="ceph")).storages[0]

    assert status.active and status.shared and status.storage_type is StorageType.RBD
    assert 0 < status.avail <= GIB and status.total == status.used + status.avail


async def test_an_rbd_disk_is_a_layered_image_and_bad_requests_create_nothing(bus, ioctx):
    volume = await allocate(bus, 300)
    rbd = importlib.import_module("rbd")

    assert volume.volid == "ceph:vm-300-disk-0" and volume.format == "raw"
    with image(ioctx, "vm-300-disk-0") as disk:
        assert disk.size() == 64 * MIB and disk.features() & rbd.RBD_FEATURE_LAYERING
    before = sorted(rbd.RBD().list(ioctx))
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.INVALID, "size", storage="ceph", vmid=300,
                  size=8 * GIB)  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.INVALID, "format", storage="ceph", vmid=300,
                  size=MIB, format=DiskFormat.QCOW2)  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.EXISTS, "filename", storage="ceph", vmid=300,
                  size=MIB, filename="vm-300-disk-0")  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.INVALID, "content", storage="ceph", vmid=300,
                  size=MIB, content=ContentType.ISO)  # fmt: skip
    assert sorted(rbd.RBD().list(ioctx)) == before
    listing = await call(bus, s.CONTENT_LIST, storage="ceph", vmid=300)
    assert [v.volid for v in listing.volumes] == ["ceph:vm-300-disk-0"]


async def test_a_volume_read_has_its_usage_from_the_cluster_and_its_path(bus, ioctx, ceph_cluster):
    volume = await allocate(bus, 305)
    info = (await call(bus, s.VOLUME_INFO, volid=volume.volid)).volume
    assert info.used == 0 and info.size == 64 * MIB
    with image(ioctx, "vm-305-disk-0") as disk:
        disk.write(b"\x11" * 4096, 0)  # one 4 MiB object
        disk.write(b"\x22" * 4096, 40 * MIB)  # and another
    info = (await call(bus, s.VOLUME_INFO, volid=volume.volid)).volume
    assert info.used == 8 * MIB, info
    monitor = f"{ceph_cluster.host}:{ceph_cluster.mon_port}"
    assert info.path == (f"rbd:{ceph_cluster.pool}/vm-305-disk-0:mon_host={monitor}"
                         ":auth_supported=cephx:id=admin")  # fmt: skip

    # A linked clone counts only what it wrote itself, not what it shares with its base.
    base = (await call(bus, s.VOLUME_CREATE_BASE, volid=volume.volid)).volume
    clone = (await call(bus, s.VOLUME_CLONE, volid=base.volid, vmid=306, linked=True)).volume
    assert (await call(bus, s.VOLUME_INFO, volid=clone.volid)).volume.used == 0
    with image(ioctx, "vm-306-disk-0") as disk:
        disk.write(b"\x33" * 4096, 20 * MIB)
    assert (await call(bus, s.VOLUME_INFO, volid=clone.volid)).volume.used == 4 * MIB
    listed = (await call(bus, s.CONTENT_LIST, storage="ceph", vmid=306)).volumes
    assert [v.path for v in listed] == [None]  # listings stay cheap: no per-image scan
    await call(bus, s.VOLUME_FREE, volid=clone.volid)
    await call(bus, s.VOLUME_FREE, volid=base.volid)


async def test_rbd_snapshots_roll_back_the_data(bus, ioctx):
    volume = await allocate(bus, 310)
    with image(ioctx, "vm-310-disk-0") as disk:
        disk.write(b"\xab" * 4096, 0)
    await call(bus, s.SNAPSHOT_CREATE, volid=volume.volid, snapname="before")
    with image(ioctx, "vm-310-disk-0") as disk:
        disk.write(b"\xcd" * 4096, 0)

    await call(bus, s.SNAPSHOT_ROLLBACK, volid=volume.volid, snapname="before")

    with image(ioctx, "vm-310-disk-0") as disk:
        assert disk.read(0, 4096) == b"\xab" * 4096
    await call(bus, s.SNAPSHOT_DELETE, volid=volume.volid, snapname="before")
    await refused(bus, s.SNAPSHOT_DELETE, ErrorCode.NOT_FOUND, "snapname", volid=volume.volid,
                  snapname="before")  # fmt: skip


async def test_linked_clones_are_copy_on_write_children_of_a_protected_base(bus, ioctx):
    volume = await allocate(bus, 320)
    with image(ioctx, "vm-320-disk-0") as disk:
        disk.write(b"\x5a" * 4096, 8192)
    base = (await call(bus, s.VOLUME_CREATE_BASE, volid=volume.volid)).volume
    clone = (await call(bus, s.VOLUME_CLONE, volid=base.volid, vmid=321, linked=True)).volume

    assert base.volid == "ceph:base-320-disk-0"
    assert clone.volid == "ceph:base-320-disk-0/vm-321-disk-0" and clone.parent == base.volid
    with image(ioctx, "base-320-disk-0") as disk:
        assert disk.is_protected_snap("__base__")
    with image(ioctx, "vm-321-disk-0") as disk:
        assert disk.parent_info()[1:] == ("base-320-disk-0", "__base__")
        assert disk.read(8192, 4096) == b"\x5a" * 4096
    error = await refused(bus, s.VOLUME_FREE, ErrorCode.INVALID, "volid", volid=base.volid)
    assert error.details["clones"] == [clone.volid]
    await refused(bus, s.VOLUME_RESIZE, ErrorCode.INVALID, "volid", volid=base.volid, size=GIB)
    plain = await allocate(bus, 322)
    await refused(bus, s.VOLUME_CLONE, ErrorCode.INVALID, "volid", volid=plain.volid, vmid=323,
                  linked=True)  # fmt: skip

    await call(bus, s.VOLUME_FREE, volid=clone.volid)
    await call(bus, s.VOLUME_FREE, volid=base.volid)
    assert "base-320-disk-0" not in importlib.import_module("rbd").RBD().list(ioctx)


async def test_a_snapshot_with_linked_clones_cannot_be_deleted(bus):
    volume = await allocate(bus, 330)
    base = (await call(bus, s.VOLUME_CREATE_BASE, volid=volume.volid)).volume
    await call(bus, s.SNAPSHOT_CREATE, volid=base.volid, snapname="gold")
    clone = (await call(bus, s.VOLUME_CLONE, volid=base.volid, vmid=331, linked=True,
                        snapname="gold")).volume  # fmt: skip

    error = await refused(bus, s.SNAPSHOT_DELETE, ErrorCode.INVALID, "snapname",
                          volid=base.volid, snapname="gold")  # fmt: skip
    assert clone.volid in error.message

    await call(bus, s.VOLUME_FREE, volid=clone.volid)
    await call(bus, s.SNAPSHOT_DELETE, volid=base.volid, snapname="gold")


async def test_full_copies_within_ceph_and_out_to_a_dir_storage_keep_the_data(
    bus, ioctx, rbd_stack
):
    volume = await allocate(bus, 340, size=16 * MIB)
    with image(ioctx, "vm-340-disk-0") as disk:
        disk.write(b"\x33" * MIB, 4 * MIB)

    inside = (await call(bus, s.VOLUME_CLONE, volid=volume.volid, vmid=341)).volume
    outside = (await call(bus, s.VOLUME_CLONE, volid=volume.volid, vmid=342, storage="local",
                          format=DiskFormat.QCOW2)).volume  # fmt: skip
    back = (await call(bus, s.VOLUME_CLONE, volid=outside.volid, vmid=343, storage="ceph")).volume

    assert inside.volid == "ceph:vm-341-disk-0" and back.volid == "ceph:vm-343-disk-0"
    assert outside.volid == "local:342/vm-342-disk-0.qcow2"
    for name in ("vm-341-disk-0", "vm-343-disk-0"):
        with image(ioctx, name) as disk:
            assert disk.read(4 * MIB, MIB) == b"\x33" * MIB and disk.size() == 16 * MIB
    path = rbd_stack[1] / "local/images/342/vm-342-disk-0.qcow2"
    assert "verification failed" not in qemu_io_read(path, "read -P 0x33 4M 1M")
    assert not any((rbd_stack[1] / "state/staging").iterdir())


async def test_rename_resize_and_map_an_rbd_disk(bus, ceph_cluster):
    volume = await allocate(bus, 350)
    moved = (await call(bus, s.VOLUME_RENAME, volid=volume.volid, vmid=351)).volume
    grown = (await call(bus, s.VOLUME_RESIZE, volid=moved.volid, size=128 * MIB)).volume
    mapping = await call(bus, s.VOLUME_MAP, volid=moved.volid)

    assert moved.volid == "ceph:vm-351-disk-0" and grown.size == 128 * MIB
    await refused(bus, s.VOLUME_RESIZE, ErrorCode.INVALID, "size", volid=moved.volid, size=MIB)
    assert mapping.protocol is s.VolumeProtocol.RBD and mapping.path == "rbd/vm-351-disk-0"
    assert mapping.secret == ceph_cluster.admin_key and mapping.username == "admin"
    assert f'<host name="127.0.0.1" port="{ceph_cluster.mon_port}" />' in mapping.libvirt_disk


async def test_a_storage_with_a_wrong_key_is_inactive_and_refuses_work(bus, ceph_cluster):
    await call(bus, s.DEFINITION_CREATE, definition=StorageDefinition(
        storage="badkey", storage_type=StorageType.RBD, content=(ContentType.IMAGES,),
        monhost=(ceph_cluster.monhost,)), keyring="AQBvaHNl" + "A" * 30 + "==")  # fmt: skip

    status = (await call(bus, s.STATUS, storage="badkey")).storages[0]
    assert not status.active
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.UNAVAILABLE, "storage", storage="badkey",
                  vmid=360, size=MIB)  # fmt: skip


async def test_rbd_orphans_are_reported_not_deleted(bus, ioctx):
    volume = await allocate(bus, 370)

    orphans = await call(bus, s.ORPHANS, storage="ceph")

    assert volume.volid in [v.volid for v in orphans.volumes]
    assert "vm-370-disk-0" in importlib.import_module("rbd").RBD().list(ioctx)


async def test_a_base_recreated_on_another_node_is_cloned_with_its_new_size(bus, rbd_stack):
    url, root = rbd_stack
    other = start_storage(url, root / "state-n2", node="n2",
                          RUCHER_STORAGE_LOCAL_PATH=str(root / "local-n2"))  # fmt: skip
    try:
        await wait_ready(url, other, node="n2")
        first = await allocate(bus, 380)
        base = (await call(bus, s.VOLUME_CREATE_BASE, volid=first.volid)).volume
        clone = (await call(bus, s.VOLUME_CLONE, volid=base.volid, vmid=381, linked=True)).volume
        assert clone.size == 64 * MIB  # n1 now knows the base's size

        await call(bus, s.VOLUME_FREE, node="n2", volid=clone.volid)
        await call(bus, s.VOLUME_FREE, node="n2", volid=base.volid)
        again = (await call(bus, s.VOLUME_ALLOCATE, node="n2", storage="ceph", vmid=380,
                            size=32 * MIB)).volume  # fmt: skip
        await call(bus, s.VOLUME_CREATE_BASE, node="n2", volid=again.volid)

        clone = (await call(bus, s.VOLUME_CLONE, volid=base.volid, vmid=382, linked=True)).volume
        assert clone.size == 32 * MIB
    finally:
        stop_storage(other)


@pytest.mark.slow
def test_a_cluster_following_the_dev_stack_stops_when_the_stack_does(tmp_path):
    from rucher.testing.ceph import CephCluster, ceph_unavailable

    if (reason := ceph_unavailable()) is not None:
        pytest.skip(f"Ceph unavailable: {reason}")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              "rucher.testing.stack"])  # fmt: skip
    pid_file = tmp_path / "supervisor.pid"
    pid_file.write_text(f"{owner.pid}\n")
    root = tmp_path / "ceph"
    up = subprocess.run([sys.executable, "-m", "rucher.testing.ceph", "up", "--root", str(root),
                         "--print-conf", "--follow", str(pid_file)],
                        capture_output=True, text=True, check=False, timeout=90)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == str(root / "ceph.conf")
        cluster = CephCluster.load(root)
        time.sleep(1.5)
        assert cluster.running  # the owner lives: Ceph stays

        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 15
        while (cluster.running or root.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not cluster.running and not root.exists()
    finally:
        owner.kill()
        if root.exists():
            CephCluster.load(root).stop()


# One Ceph for a multi-node harness -------------------------------------------------------------


async def _storage_answers(bus, node: str, timeout: float = 60.0):
    """The ``ceph`` storage's status on ``node`` once its storage service reports it active."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            statuses = (await call(bus, s.STATUS, node=node, storage="ceph")).storages
            if statuses and statuses[0].active:
                return statuses[0]
        except RucherError as err:
            if err.code not in {ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.NOT_FOUND}:
                raise
        assert time.monotonic() < deadline, f"the storage service of {node} never saw Ceph"
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_the_harness_ceph_on_its_bridge_is_one_shared_storage_for_every_node(
    harness_factory,
):
    harness = harness_factory(2, ceph=True)
    n1, n2 = harness.nodes
    ceph = harness.ceph
    assert ceph is not None and ceph.host == harness.bridge_address
    assert harness.bridge_address in ceph.monhost
    # The monitor answers from inside a node's namespace (the bridge), not only from the host.
    stat = [*n2.wrap, "ceph", "-c", str(ceph.conf), "--connect-timeout", "10", "mon", "stat"]
    probe = await asyncio.to_thread(
        subprocess.run, stat, check=False, capture_output=True, text=True, timeout=30
    )
    assert probe.returncode == 0, probe.stderr
    for node in harness.nodes:
        node.start_service("storage", [sys.executable, "-m", "rucher.storage"],
                           {"RUCHER_STORAGE_STATUS_INTERVAL": "1"})  # fmt: skip

    async with connected(harness.urls, node="n1", service="test-client") as bus:
        for node in harness.nodes:
            status = await _storage_answers(bus, node.name)
            assert status.shared and status.storage_type is StorageType.RBD

        # Allocated through n1's storage service...
        volume = (await call(bus, s.VOLUME_ALLOCATE, node=n1.name, storage="ceph", vmid=400,
                             size=16 * MIB)).volume  # fmt: skip
        assert volume.volid == "ceph:vm-400-disk-0"
        # ...n2 lists it, reads it, maps it for its hypervisor, grows and snapshots it.
        listed = (await call(bus, s.CONTENT_LIST, node=n2.name, storage="ceph", vmid=400)).volumes
        assert [v.volid for v in listed] == [volume.volid]
        mapping = await call(bus, s.VOLUME_MAP, node=n2.name, volid=volume.volid)
        assert mapping.path == f"{ceph.pool}/vm-400-disk-0"
        assert f'name="{harness.bridge_address}"' in mapping.libvirt_source
        await call(bus, s.VOLUME_RESIZE, node=n2.name, volid=volume.volid, size=32 * MIB)
        await call(bus, s.SNAPSHOT_CREATE, node=n2.name, volid=volume.volid, snapname="shared")
        # n1 sees what n2 did: one cluster, one image.
        info = (await call(bus, s.VOLUME_INFO, node=n1.name, volid=volume.volid)).volume
        assert info.size == 32 * MIB and info.path.startswith(f"rbd:{ceph.pool}/vm-400-disk-0:")
        await refused(bus, s.SNAPSHOT_CREATE, ErrorCode.EXISTS, "snapname", node=n1.name,
                      volid=volume.volid, snapname="shared")  # fmt: skip
        await call(bus, s.SNAPSHOT_DELETE, node=n1.name, volid=volume.volid, snapname="shared")
        await call(bus, s.VOLUME_FREE, node=n2.name, volid=volume.volid)
        assert (await call(bus, s.CONTENT_LIST, node=n1.name, storage="ceph")).volumes == ()
