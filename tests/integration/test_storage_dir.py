"""The storage service process on a real nats-server with real qemu-img files (dir storage)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats.js.errors
import pytest

from rucher.bus import KV
from rucher.bus.codec import encode
from rucher.guests import config_digest
from rucher.proto import compute
from rucher.proto import storage as s
from rucher.proto.bus import AppliedCommand
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.keys import make_key
from rucher.proto.node import ServiceInstance
from rucher.proto.storage import ContentType, DiskFormat, StorageDefinition, StorageType
from rucher.proto.streams import GUESTS, IDEMPOTENCY, UPLOADS
from rucher.registry import ServiceRegistry
from rucher.testing.nats import NatsServer

from .buses import connected, until
from .storage_service import call, cid, finished, refused, start_storage, stop_storage, wait_ready

pytestmark = pytest.mark.integration

GIB = 1 << 30
DATA = bytes(range(256)) * 4096 * 3  # 3 MiB: many object-store chunks


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """One nats-server and one storage service (node n1) for the module."""
    root = tmp_path_factory.mktemp("storage")
    server = NatsServer(name="nats-storage", store_dir=root / "store")
    server.start()
    server.wait_ready()
    process = start_storage(
        server.url,
        root / "state",
        RUCHER_STORAGE_LOCAL_PATH=str(root / "local"),
        RUCHER_STORAGE_STATUS_INTERVAL="1",
        RUCHER_STORAGE_TRANSFER_TIMEOUT="5",
    )
    try:
        asyncio.run(wait_ready(server.url, process))
        yield server.url, root
    finally:
        stop_storage(process)
        server.stop()


@pytest.fixture
async def bus(stack):
    async with connected(stack[0], service="test-client") as client:
        yield client


@pytest.fixture
def local(stack) -> Path:
    return stack[1] / "local"


def qemu_img_info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out)


def qemu_img_snapshots(path: Path) -> str:
    return subprocess.run(["qemu-img", "snapshot", "-l", str(path)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def qemu_io(path: Path, fmt: str, command: str) -> str:
    done = subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout + done.stderr


async def allocate(bus, vmid: int, **fields):
    fields.setdefault("size", GIB)
    fields.setdefault("storage", "local")
    return (await call(bus, s.VOLUME_ALLOCATE, vmid=vmid, **fields)).volume


# Definitions and status ---------------------------------------------------------------------


async def test_local_exists_and_definitions_are_created_guarded_and_deleted(bus, tmp_path):
    listing = await call(bus, s.DEFINITION_LIST)
    assert "local" in [e.definition.storage for e in listing.definitions]
    scratch = StorageDefinition(storage="scratch", storage_type=StorageType.DIR,
                                content=(ContentType.ISO,), path=str(tmp_path))  # fmt: skip
    await call(bus, s.DEFINITION_CREATE, definition=scratch)
    await refused(bus, s.DEFINITION_CREATE, ErrorCode.EXISTS, "storage", definition=scratch)

    report = await call(bus, s.STATUS, storage="scratch")
    assert report.storages[0].active and report.storages[0].avail > 0
    digest = (await call(bus, s.DEFINITION_LIST, storage="scratch")).definitions[0].digest
    both = (ContentType.ISO, ContentType.VZTMPL)
    wider = StorageDefinition(storage="scratch", storage_type=StorageType.DIR, content=both,
                              path=str(tmp_path))  # fmt: skip
    await call(bus, s.DEFINITION_UPDATE, definition=wider, digest=digest)
    await refused(bus, s.DEFINITION_UPDATE, ErrorCode.CONFLICT, "digest", definition=wider,
                  digest=digest)  # fmt: skip
    await call(bus, s.DEFINITION_DELETE, storage="scratch")
    await refused(bus, s.STATUS, ErrorCode.NOT_FOUND, "storage", storage="scratch")


async def test_each_node_publishes_its_storages_and_their_usage(bus):
    events = []

    async def collect(msg):
        events.append(msg)

    sub = await bus.nc.subscribe(s.STATUS_PUBLISHED.to(node="n1").subject, cb=collect)
    await until(lambda: bool(events), timeout=5)
    await sub.unsubscribe()
    assert b'"storage":"local"' in events[0].data


# Volumes ------------------------------------------------------------------------------------


async def test_a_qcow2_disk_is_a_file_in_the_proxmox_layout(bus, local):
    volume = await allocate(bus, 100, format=DiskFormat.QCOW2)

    path = local / "images/100/vm-100-disk-0.qcow2"
    assert volume.volid == "local:100/vm-100-disk-0.qcow2" and volume.size == GIB
    info = qemu_img_info(path)
    assert (info["format"], info["virtual-size"]) == ("qcow2", GIB)
    listing = await call(bus, s.CONTENT_LIST, storage="local", vmid=100)
    assert [v.volid for v in listing.volumes] == [volume.volid]
    mapping = await call(bus, s.VOLUME_MAP, volid=volume.volid)
    assert mapping.path == str(path) and f'<source file="{path}" />' in mapping.libvirt_disk
    await call(bus, s.VOLUME_FREE, volid=volume.volid)
    assert not path.exists() and not path.parent.exists()


async def test_bad_allocations_are_refused_and_create_nothing(bus, local):
    await allocate(bus, 110, filename="vm-110-disk-0.raw")
    before = sorted(p.name for p in (local / "images").rglob("*"))

    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.NOT_FOUND, "storage", storage="nowhere",
                  vmid=110, size=GIB)  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.INVALID, "content", storage="local",
                  vmid=110, size=GIB, content=ContentType.ISO)  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.EXISTS, "filename", storage="local",
                  vmid=110, size=GIB, filename="vm-110-disk-0.raw")  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.INVALID, "size", storage="local",
                  vmid=110, size=1 << 60)  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.INVALID, "filename", storage="local",
                  vmid=110, size=GIB, filename="vm-111-disk-0")  # fmt: skip
    await refused(bus, s.VOLUME_ALLOCATE, ErrorCode.MALFORMED, "vmid", storage="local",
                  vmid=5, size=GIB)  # fmt: skip
    assert sorted(p.name for p in (local / "images").rglob("*")) == before


async def test_a_repeated_command_is_applied_once(bus, local):
    command_id = cid()
    first = await allocate(bus, 120, command_id=command_id)
    again = await allocate(bus, 120, command_id=command_id)
    twice = cid()
    both = await asyncio.gather(allocate(bus, 120, command_id=twice),
                                allocate(bus, 120, command_id=twice))  # fmt: skip

    assert first.volid == again.volid == "local:120/vm-120-disk-0.raw"
    assert both[0].volid == both[1].volid == "local:120/vm-120-disk-1.raw"
    assert sorted(p.name for p in (local / "images/120").iterdir()) == [
        "vm-120-disk-0.raw",
        "vm-120-disk-1.raw",
    ]


async def _recorded(bus, volid: str) -> str:
    """A command id whose reply an instance of the storage service recorded (as a predecessor)."""
    command_id = cid()
    info = s.VolumeInfo(volid=volid, content=ContentType.IMAGES, format="raw", size=1)
    record = AppliedCommand(applier="storage", time=time.time(),
                            reply=encode(s.VolumeDetails(volume=info)))  # fmt: skip
    await KV(bus, IDEMPOTENCY, AppliedCommand).put(make_key("storage", command_id), record)
    return command_id


async def test_a_command_recorded_before_the_service_started_is_not_applied_again(stack, bus):
    url, root = stack
    early = await _recorded(bus, "local:141/vm-141-disk-5.raw")
    local = root / "local-n2"
    process = start_storage(url, root / "state-n2", node="n2",
                            RUCHER_STORAGE_LOCAL_PATH=str(local))  # fmt: skip
    try:
        await wait_ready(url, process, node="n2")
        # No other instance on n2: the ids listed at start are all it needs to look up.
        first = await allocate(bus, 141, command_id=early, node="n2")
        assert first.volid == "local:141/vm-141-disk-5.raw"  # the recorded reply, not a new disk
        assert not (local / "images/141").exists()
        fresh = await allocate(bus, 141, node="n2")
        assert fresh.volid == "local:141/vm-141-disk-0.raw"
        assert [p.name for p in (local / "images/141").iterdir()] == ["vm-141-disk-0.raw"]
    finally:
        stop_storage(process)


async def test_while_a_predecessor_is_registered_every_command_is_looked_up(stack, bus):
    url, root = stack
    predecessor = ServiceInstance(service="storage", node="n3", instance="predecessor",
                                  version="0", address="", pid=1, started=time.time())  # fmt: skip
    lease = await ServiceRegistry(bus).register(predecessor, ttl=3.0)
    local = root / "local-n3"
    process = start_storage(url, root / "state-n3", node="n3",
                            RUCHER_STORAGE_LOCAL_PATH=str(local))  # fmt: skip
    try:
        await wait_ready(url, process, node="n3")
        # Answered by the predecessor after this instance listed the bucket: still honoured.
        late = await _recorded(bus, "local:142/vm-142-disk-6.raw")
        again = await allocate(bus, 142, command_id=late, node="n3")
        assert again.volid == "local:142/vm-142-disk-6.raw"
        assert not (local / "images/142").exists()
    finally:
        await lease.release()
        stop_storage(process)


async def test_resize_grows_and_never_shrinks(bus, local):
    volume = await allocate(bus, 130, format=DiskFormat.QCOW2)
    grown = await call(bus, s.VOLUME_RESIZE, volid=volume.volid, size=2 * GIB)

    assert grown.volume.size == 2 * GIB
    assert qemu_img_info(local / "images/130/vm-130-disk-0.qcow2")["virtual-size"] == 2 * GIB
    await refused(bus, s.VOLUME_RESIZE, ErrorCode.INVALID, "size", volid=volume.volid, size=GIB)


async def test_snapshots_are_qcow2_internal_snapshots_and_roll_back_the_data(bus, local):
    volume = await allocate(bus, 140, format=DiskFormat.QCOW2, size=64 << 20)
    path = local / "images/140/vm-140-disk-0.qcow2"
    qemu_io(path, "qcow2", "write -P 0xab 0 64k")

    await call(bus, s.SNAPSHOT_CREATE, volid=volume.volid, snapname="before")
    await refused(bus, s.SNAPSHOT_CREATE, ErrorCode.EXISTS, "snapname", volid=volume.volid,
                  snapname="before")  # fmt: skip
    qemu_io(path, "qcow2", "write -P 0xcd 0 64k")
    await call(bus, s.SNAPSHOT_ROLLBACK, volid=volume.volid, snapname="before")

    assert "Pattern verification failed" not in qemu_io(path, "qcow2", "read -P 0xab 0 64k")
    await call(bus, s.SNAPSHOT_DELETE, volid=volume.volid, snapname="before")
    assert "before" not in qemu_img_snapshots(path)
    await refused(bus, s.SNAPSHOT_ROLLBACK, ErrorCode.NOT_FOUND, "snapname", volid=volume.volid,
                  snapname="before")  # fmt: skip
    raw = await allocate(bus, 140)
    await refused(bus, s.SNAPSHOT_CREATE, ErrorCode.UNSUPPORTED, "volid", volid=raw.volid,
                  snapname="before")  # fmt: skip


async def test_linked_clones_hang_on_a_read_only_base_that_cannot_go_while_they_exist(bus, local):
    volume = await allocate(bus, 150, format=DiskFormat.QCOW2, size=64 << 20)
    qemu_io(local / "images/150/vm-150-disk-0.qcow2", "qcow2", "write -P 0x5a 0 1M")
    base = (await call(bus, s.VOLUME_CREATE_BASE, volid=volume.volid)).volume
    clone = (await call(bus, s.VOLUME_CLONE, volid=base.volid, vmid=151, linked=True)).volume

    base_path = local / "images/150/base-150-disk-0.qcow2"
    clone_path = local / "images/151/vm-151-disk-0.qcow2"
    assert base.volid == "local:150/base-150-disk-0.qcow2" and base_path.stat().st_mode & 0o222 == 0
    assert clone.volid == "local:150/base-150-disk-0.qcow2/151/vm-151-disk-0.qcow2"
    assert clone.parent == base.volid and clone.size == 64 << 20
    assert qemu_img_info(clone_path)["backing-filename"] == "../150/base-150-disk-0.qcow2"
    assert "Pattern verification failed" not in qemu_io(clone_path, "qcow2", "read -P 0x5a 0 1M")
    error = await refused(bus, s.VOLUME_FREE, ErrorCode.INVALID, "volid", volid=base.volid)
    assert clone.volid in error.message and error.details["clones"] == [clone.volid]
    await refused(bus, s.VOLUME_CLONE, ErrorCode.INVALID, "volid", volid=clone.volid, vmid=152,
                  linked=True)  # fmt: skip

    await call(bus, s.VOLUME_FREE, volid=clone.volid)
    await call(bus, s.VOLUME_FREE, volid=base.volid)
    assert not base_path.exists()


async def test_a_full_clone_copies_the_data_into_another_format(bus, local):
    volume = await allocate(bus, 160, format=DiskFormat.QCOW2, size=64 << 20)
    qemu_io(local / "images/160/vm-160-disk-0.qcow2", "qcow2", "write -P 0x33 1M 1M")

    copy = (await call(bus, s.VOLUME_CLONE, volid=volume.volid, vmid=161,
                       format=DiskFormat.RAW)).volume  # fmt: skip

    path = local / "images/161/vm-161-disk-0.raw"
    assert copy.volid == "local:161/vm-161-disk-0.raw" and copy.size == 64 << 20
    assert "Pattern verification failed" not in qemu_io(path, "raw", "read -P 0x33 1M 1M")


async def test_a_copy_that_fails_midway_removes_what_it_made(bus, local):
    volume = await allocate(bus, 170, format=DiskFormat.QCOW2, size=64 << 20)
    source = local / "images/170/vm-170-disk-0.qcow2"
    with source.open("r+b") as image:  # no longer a qcow2 image: qemu-img convert fails
        image.write(b"JUNK")

    await refused(bus, s.VOLUME_CLONE, ErrorCode.INTERNAL, None, volid=volume.volid, vmid=171)
    assert not (local / "images/171").exists()


async def test_a_disk_changes_owner_by_rename(bus, local):
    volume = await allocate(bus, 180, format=DiskFormat.QCOW2)
    moved = (await call(bus, s.VOLUME_RENAME, volid=volume.volid, vmid=181)).volume

    assert moved.volid == "local:181/vm-181-disk-0.qcow2" and moved.vmid == 181
    assert (local / "images/181/vm-181-disk-0.qcow2").exists()
    assert not (local / "images/180").exists()


async def test_orphans_are_reported_until_their_guest_exists_and_never_deleted(bus, local):
    volume = await allocate(bus, 190)
    assert volume.volid in [v.volid for v in (await call(bus, s.ORPHANS, storage="local")).volumes]

    guests: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)
    await guests.put("190", GuestRecord(vmid=190, type=GuestType.QEMU, node="n1", config={},
                                        digest=config_digest({}, None)))  # fmt: skip
    orphans = (await call(bus, s.ORPHANS, storage="local")).volumes
    assert volume.volid not in [v.volid for v in orphans]
    assert (local / "images/190/vm-190-disk-0.raw").exists()
    await refused(bus, s.VOLUME_FREE, ErrorCode.INVALID, "volid", volid=volume.volid,
                  check_owner=True)  # fmt: skip
    await call(bus, s.VOLUME_UPDATE, volid=volume.volid, notes="keep", protected=True)
    await refused(bus, s.VOLUME_FREE, ErrorCode.INVALID, "volid", volid=volume.volid)
    info = (await call(bus, s.VOLUME_INFO, volid=volume.volid)).volume
    assert info.notes == "keep" and info.protected


async def test_a_volume_a_running_guest_attaches_is_not_changed(stack, bus, local):
    volume = await allocate(bus, 195, format=DiskFormat.QCOW2, size=1 << 20)
    path = local / "images/195/vm-195-disk-0.qcow2"
    guests: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)
    states = {195: PowerState.RUNNING}

    async def status(query: compute.VmStatusQuery, _headers) -> compute.VmStatusReport:
        return compute.VmStatusReport(vmid=query.vmid, status=states[query.vmid])

    config = {"scsi0": f"{volume.volid},size=1M"}
    await guests.put("195", GuestRecord(vmid=195, type=GuestType.QEMU, node="n1", config=config,
                                        digest=config_digest(config, None)))  # fmt: skip
    async with connected(stack[0], node="n1", service="compute") as agent:
        await agent.serve(compute.GUEST_STATUS, status, node="n1")
        for subject, fields in [
            (s.VOLUME_FREE, {}),
            (s.VOLUME_RESIZE, {"size": 4 << 20}),
            (s.VOLUME_RENAME, {"vmid": 196}),
        ]:
            error = await refused(bus, subject, ErrorCode.INVALID, "volid", volid=volume.volid,
                                  **fields)  # fmt: skip
            assert "in use by running guest 195" in error.message, error
        assert qemu_img_info(path)["virtual-size"] == 1 << 20

        states[195] = PowerState.STOPPED
        grown = (await call(bus, s.VOLUME_RESIZE, volid=volume.volid, size=4 << 20)).volume
        assert grown.size == 4 << 20

        # A guest of another node cannot attach this node's local copy of the volume.
        away = GuestRecord(vmid=195, type=GuestType.QEMU, node="n9", config=config,
                           digest=config_digest(config, None))  # fmt: skip
        await guests.put("195", away)
        states[195] = PowerState.RUNNING
        grown = (await call(bus, s.VOLUME_RESIZE, volid=volume.volid, size=8 << 20)).volume
        assert grown.size == 8 << 20
        home = GuestRecord(vmid=195, type=GuestType.QEMU, node="n1", config=config,
                           digest=config_digest(config, None))  # fmt: skip
        await guests.put("195", home)
    # Its agent gone, whether the guest runs is unknown: refused as unavailable, not risked.
    error = await refused(bus, s.VOLUME_FREE, ErrorCode.UNAVAILABLE, "volid", volid=volume.volid)
    assert "cannot tell whether guest 195 on node 'n1'" in error.message
    await guests.delete("195")
    await call(bus, s.VOLUME_FREE, volid=volume.volid)
    assert not path.exists()


# Uploads and downloads ----------------------------------------------------------------------


async def put_object(bus, name: str, data: bytes) -> None:
    store = await bus.js.object_store(UPLOADS.name)
    await store.put(name, data)


async def test_an_upload_lands_whole_verified_and_the_object_is_deleted(bus, local):
    await put_object(bus, "up-1", DATA)
    sha = hashlib.sha256(DATA).hexdigest()

    accepted = await call(bus, s.CONTENT_UPLOAD, user="root@pam", storage="local", object="up-1",
                          filename="live.iso", content=ContentType.ISO, checksum=sha,
                          checksum_algorithm=s.ChecksumAlgorithm.SHA256)  # fmt: skip

    state = await finished(bus, accepted.upid)
    assert state.exitstatus == "OK" and state.type == "imgcopy"
    assert (local / "template/iso/live.iso").read_bytes() == DATA
    store = await bus.js.object_store(UPLOADS.name)
    with pytest.raises(nats.js.errors.ObjectNotFoundError):
        await store.get_info("up-1")
    listing = await call(bus, s.CONTENT_LIST, storage="local", content=ContentType.ISO)
    assert "local:iso/live.iso" in [v.volid for v in listing.volumes]


async def test_a_cut_off_upload_leaves_nothing_visible(bus, local):
    await put_object(bus, "up-cut", DATA)
    stream = f"OBJ_{UPLOADS.name}"
    info = await bus.js.stream_info(stream)
    chunks = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:  # earlier objects' deleted messages
            continue
        if msg.subject.startswith(f"$O.{UPLOADS.name}.C."):
            chunks.append(seq)
    for seq in chunks[-3:]:  # the upload's last chunks never arrived
        await bus.js.delete_msg(stream, seq)

    accepted = await call(bus, s.CONTENT_UPLOAD, user="root@pam", storage="local",
                          object="up-cut", filename="cut.iso", content=ContentType.ISO)  # fmt: skip

    state = await finished(bus, accepted.upid)
    assert "incomplete" in state.exitstatus
    assert (
        sorted(p.name for p in (local / "template/iso").iterdir()) == ["live.iso"]
        or not (local / "template/iso/cut.iso").exists()
    )
    assert not any(p.name.endswith(".partial") for p in (local / "template/iso").iterdir())


async def test_an_upload_failing_its_checksum_leaves_nothing_visible(bus, local):
    await put_object(bus, "up-bad", DATA)

    accepted = await call(bus, s.CONTENT_UPLOAD, user="root@pam", storage="local",
                          object="up-bad", filename="bad.iso", content=ContentType.ISO,
                          checksum="0" * 64,
                          checksum_algorithm=s.ChecksumAlgorithm.SHA256)  # fmt: skip

    state = await finished(bus, accepted.upid)
    assert "checksum mismatch" in state.exitstatus
    assert not (local / "template/iso/bad.iso").exists()
    assert not any(p.name.endswith(".partial") for p in (local / "template/iso").iterdir())


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/missing.iso":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA if self.path == "/ok.tar.gz" else DATA[: len(DATA) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_download_url_fetches_from_an_address_the_node_reaches(bus, local, web):
    accepted = await call(bus, s.CONTENT_DOWNLOAD, user="root@pam", storage="local",
                          url=f"{web}/ok.tar.gz", filename="alpine.tar.gz",
                          content=ContentType.VZTMPL)  # fmt: skip

    state = await finished(bus, accepted.upid)
    assert state.exitstatus == "OK" and state.type == "download"
    assert (local / "template/cache/alpine.tar.gz").read_bytes() == DATA


@pytest.mark.parametrize(("path", "reason"), [("/missing.iso", "404"), ("/cut.iso", "failed")])
async def test_a_failed_or_cut_off_download_leaves_nothing(bus, local, web, path, reason):
    name = f"dl-{path.strip('/')}"
    accepted = await call(bus, s.CONTENT_DOWNLOAD, user="root@pam", storage="local",
                          url=f"{web}{path}", filename=name, content=ContentType.ISO)  # fmt: skip

    state = await finished(bus, accepted.upid)
    assert reason in state.exitstatus
    assert not (local / "template/iso" / name).exists()


async def test_a_volume_copy_runs_as_a_task(bus, local):
    volume = await allocate(bus, 195, format=DiskFormat.QCOW2, size=32 << 20)

    accepted = await call(bus, s.VOLUME_COPY, user="root@pam", volid=volume.volid, vmid=196)

    state = await finished(bus, accepted.upid)
    assert state.exitstatus == "OK"
    assert (local / "images/196/vm-196-disk-0.qcow2").exists()
