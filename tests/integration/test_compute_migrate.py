"""Migration between two harness nodes, each with its own libvirtd, storage service and agent.

The nodes share the harness's Ceph (its monitor on the bridge): a guest whose disk is an RBD
image moves live from n1 to n2 through the two libvirt daemons (driven through the API), a
stopped guest moves by its definition alone, local qcow2 disks are copied (running or stopped),
a migration cut off midway leaves the guest at home, and refused migrations name their reason and
change nothing.
"""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto import storage as s
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock
from rucher.testing.harness import Harness
from rucher.testing.libvirt import GuestImage, guest_image  # noqa: F401 - fixture

from .buses import connected, until
from .gateway.stack import ADMIN, ADMIN_PASSWORD, logged_in, start_stack
from .gateway.test_qemu_helpers import finished
from .test_compute_agent import USER, guest_config, task_end

libvirt = pytest.importorskip("libvirt")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NODES = ("n1", "n2")


@dataclass
class Cluster:
    """Two harness nodes running storage and compute, with the shared Ceph."""

    harness: Harness

    def uri(self, node: str) -> str:
        """The node's own libvirtd."""
        return self.harness.node(node).libvirtd.uri

    def domains(self, node: str) -> dict[str, bool]:
        """The node's libvirt domains, name → active."""
        connection = libvirt.open(self.uri(node))
        try:
            return {
                domain.name(): bool(domain.isActive()) for domain in connection.listAllDomains()
            }
        finally:
            connection.close()

    def qemu_command(self, node: str, name: str) -> list[str]:
        """The command line of the domain's QEMU process on ``node``."""
        pid = (self.harness.node(node).libvirtd.qemu_pid_dir / f"{name}.pid").read_text().strip()
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")

    def console(self, node: str, vmid: int) -> str:
        """What the guest wrote on its serial console while it ran on ``node``."""
        log = self.harness.node(node).state_dir / "data" / "compute" / "console"
        path = log / f"{vmid}-serial0.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def cluster(harness_factory) -> Cluster:
    """n1 and n2 with a libvirtd each, the harness's Ceph (storage ``ceph``), storage and compute
    on each node."""
    harness = harness_factory(nodes=2, libvirt=True, ceph=True)
    for node in harness.nodes:
        local = str(node.state_dir / "local")
        # The default registry TTL: nothing here kills an agent, and a 3 s TTL was seen to
        # lapse on a loaded machine during a local-disk copy ("no compute agent runs there").
        extra = {"RUCHER_STORAGE_LOCAL_PATH": local}
        node.start_service("storage", [sys.executable, "-m", "rucher.storage"], extra)
        node.start_service(
            "compute",
            [sys.executable, "-m", "rucher.compute"],
            {"RUCHER_COMPUTE_SHUTDOWN_TIMEOUT": "30"},
        )
    return Cluster(harness)


@pytest.fixture
async def bus(cluster) -> AsyncIterator[Bus]:
    """A client of the harness's cluster, once every agent answers and sees ``ceph``."""
    async with connected(cluster.harness.urls, node="n1", service="test") as client:
        for node in NODES:
            await until(lambda node=node: _answers(client, node), timeout=90, every=0.3)
        yield client


async def _answers(bus: Bus, node: str) -> bool:
    try:
        await bus.request(
            compute.GUEST_STATUS.to(node=node), compute.VmStatusQuery(vmid=999_999_998), timeout=2
        )
    except RucherError as err:
        return err.code is ErrorCode.NOT_FOUND
    try:
        report = await bus.request(s.STATUS.to(node=node), s.StorageStatusQuery(), timeout=2)
    except RucherError:
        return False
    return any(status.storage == "ceph" and status.active for status in report.storages)


async def ask(bus: Bus, node: str, subject, message) -> str:  # type: ignore[no-untyped-def]
    """Send ``message`` to ``node``'s agent; the task's UPID."""
    reply = await bus.request(subject.to(node=node), message, timeout=60)
    return str(reply.upid)


async def finished_ok(bus: Bus, upid: str) -> None:
    """Wait for the task and require it to have succeeded."""
    state = await task_end(bus, upid, timeout=180)
    assert state.exitstatus == "OK", state


async def create(bus: Bus, vmid: int, image: GuestImage, *, start: bool, **disks: str) -> None:
    """Create the test guest on n1 (and start it)."""
    config = guest_config(image, name=f"migrate-{vmid}", **disks)
    command = compute.VmCreate(command_id=new_id(), vmid=vmid, user=USER, config=config)
    await finished_ok(bus, await ask(bus, "n1", compute.GUEST_CREATE, command))
    if start:
        command = compute.VmStart(command_id=new_id(), vmid=vmid, user=USER)
        await finished_ok(bus, await ask(bus, "n1", compute.GUEST_START, command))


def migrate(vmid: int, target: str, **options: bool) -> compute.VmMigrate:
    """A migration command from the test's user."""
    return compute.VmMigrate(command_id=new_id(), vmid=vmid, user=USER, target=target, **options)


async def test_a_running_guest_on_rbd_moves_live_to_the_other_node(cluster, bus, guest_image):
    vmid = 990_601
    name = f"rucher-{vmid}"
    await create(bus, vmid, guest_image, start=True, scsi0="ceph:0.1")
    guests = GuestRegistry(bus)
    record = await guests.get(vmid)
    assert record.config["scsi0"].startswith(f"ceph:vm-{vmid}-disk-0")
    # The disk reaches QEMU as a network disk, its cephx key in n1's libvirt secret.
    connection = libvirt.open(cluster.uri("n1"))
    xml = connection.lookupByName(name).XMLDesc()
    secrets = [secret.usageID() for secret in connection.listAllSecrets()]
    connection.close()
    assert "protocol='rbd'" in xml or 'protocol="rbd"' in xml
    assert secrets == ["rucher-ceph-ceph"]

    # Through the API, as a Proxmox client migrates: the preconditions, then the migration.
    gateway = start_stack(",".join(cluster.harness.urls), cluster.harness.root / "gateway")
    api = await logged_in(gateway, ADMIN, ADMIN_PASSWORD)
    try:
        check = await api.get(f"/nodes/n1/qemu/{vmid}/migrate")
        assert check.status == 200, check
        assert check.data["running"] and check.data["allowed_nodes"] == ["n2"]
        assert check.data["local_disks"] == [] and check.data["local_resources"] == []
        await until(lambda: guest_image.banner in cluster.console("n1", vmid), timeout=60)

        reply = await api.post(f"/nodes/n1/qemu/{vmid}/migrate", target="n2", online=1)
        assert reply.status == 200, reply
        assert (await finished(api, reply.data, timeout=180))["exitstatus"] == "OK"
        log = await api.get(f"/nodes/n1/tasks/{reply.data}/log", limit=100)
        lines = [line["t"] for line in log.data]
        assert any(line.startswith("migration finished in") for line in lines), lines
        print("\n".join(lines))  # the figures, shown with pytest -s

        config = await api.get(f"/nodes/n2/qemu/{vmid}/config")
        assert config.status == 200 and config.data["scsi0"] == record.config["scsi0"]
        assert (await api.get(f"/nodes/n1/qemu/{vmid}/config")).status != 200
        status = await api.get(f"/nodes/n2/qemu/{vmid}/status/current")
        assert status.status == 200 and status.data["status"] == "running", status
    finally:
        await api.close()
        gateway.stop()

    record = await guests.get(vmid)
    assert record.node == "n2" and record.lock is None
    assert name not in cluster.domains("n1")
    assert cluster.domains("n2") == {name: True}
    # The same guest carried on: n2's QEMU took it in over the wire, and it never booted there.
    assert "-incoming" in cluster.qemu_command("n2", name)
    assert guest_image.banner not in cluster.console("n2", vmid)
    report = await bus.request(compute.GUEST_STATUS.to(node="n2"), compute.VmStatusQuery(vmid=vmid))
    assert report.status is PowerState.RUNNING
    with pytest.raises(RucherError) as gone:
        await bus.request(compute.GUEST_STATUS.to(node="n1"), compute.VmStatusQuery(vmid=vmid))
    assert gone.value.code is ErrorCode.NOT_FOUND
    # n2 runs it now: stopping and destroying it there frees the RBD image too.
    stop = compute.VmStop(command_id=new_id(), vmid=vmid, user=USER)
    await finished_ok(bus, await ask(bus, "n2", compute.GUEST_STOP, stop))
    destroy = compute.VmDestroy(command_id=new_id(), vmid=vmid, user=USER, purge=True)
    await finished_ok(bus, await ask(bus, "n2", compute.GUEST_DESTROY, destroy))
    assert cluster.domains("n2") == {}


async def test_offline_migration_and_refusals(cluster, bus, guest_image):
    guests = GuestRegistry(bus)
    stopped, local = 990_611, 990_612
    await create(bus, stopped, guest_image, start=False, scsi0="ceph:0.1")
    await create(bus, local, guest_image, start=True, scsi0="local:0.1,format=qcow2")

    async def refused(command: compute.VmMigrate, field: str, words: str) -> None:
        before = await guests.get(command.vmid)
        with pytest.raises(RucherError) as caught:
            await bus.request(compute.GUEST_MIGRATE.to(node="n1"), command, timeout=60)
        assert caught.value.details.get("field") == field, caught.value
        assert words in caught.value.message
        after = await guests.get(command.vmid)
        assert (after.node, after.lock, after.digest) == (before.node, None, before.digest)

    await refused(migrate(stopped, "n9"), "target", "no such cluster node 'n9'")
    await refused(migrate(stopped, "n1"), "target", "target is local node")
    await refused(migrate(local, "n2"), "online", "without --online")
    await refused(
        migrate(local, "n2", online=True), "with-local-disks", f"local:{local}/vm-{local}-disk-0"
    )
    check = await bus.request(
        compute.GUEST_MIGRATE_CHECK.to(node="n1"), compute.VmMigrateCheck(vmid=local)
    )
    assert [disk.volid for disk in check.local_disks] == [f"local:{local}/vm-{local}-disk-0.qcow2"]
    assert cluster.domains("n1")[f"rucher-{local}"] is True
    assert cluster.domains("n2") == {}

    upid = await ask(bus, "n1", compute.GUEST_MIGRATE, migrate(stopped, "n2"))
    await finished_ok(bus, upid)
    record = await guests.get(stopped)
    assert record.node == "n2" and record.lock is not GuestLock.MIGRATE
    assert f"rucher-{stopped}" not in cluster.domains("n1")
    assert cluster.domains("n2") == {f"rucher-{stopped}": False}
    # It starts on its new node, its RBD disk mapped there.
    start = compute.VmStart(command_id=new_id(), vmid=stopped, user=USER)
    await finished_ok(bus, await ask(bus, "n2", compute.GUEST_START, start))
    assert cluster.domains("n2") == {f"rucher-{stopped}": True}


# Known flake (1 full-suite run in 3 here, with a 3 s registry TTL since dropped): the target's
# agent registration lapsed for a moment on the busy machine and the migration was refused as "no
# compute agent runs there"; one rerun on a fresh cluster stays allowed.
@pytest.mark.flaky(reruns=1)
async def test_a_running_guest_copies_its_local_disk_to_the_other_node(cluster, bus, guest_image):
    vmid = 990_621
    name = f"rucher-{vmid}"
    await create(bus, vmid, guest_image, start=True, scsi0="local:0.1,format=qcow2")
    volid = f"local:{vmid}/vm-{vmid}-disk-0.qcow2"
    relative = Path("images") / str(vmid) / f"vm-{vmid}-disk-0.qcow2"
    source = cluster.harness.node("n1").state_dir / "local" / relative
    target = cluster.harness.node("n2").state_dir / "local" / relative
    assert source.exists() and not target.exists()

    command = migrate(vmid, "n2", online=True, with_local_disks=True)
    await finished_ok(bus, await ask(bus, "n1", compute.GUEST_MIGRATE, command))

    record = await GuestRegistry(bus).get(vmid)
    assert record.node == "n2" and record.config["scsi0"].startswith(volid)
    assert cluster.domains("n2") == {name: True}
    assert name not in cluster.domains("n1")
    assert target.exists() and not source.exists()
    connection = libvirt.open(cluster.uri("n2"))
    try:
        assert str(target) in connection.lookupByName(name).XMLDesc()
    finally:
        connection.close()


async def test_a_migration_cut_off_midway_leaves_the_guest_running_at_home(
    cluster, bus, guest_image
):
    vmid = 990_631
    name = f"rucher-{vmid}"
    await create(bus, vmid, guest_image, start=True, scsi0="local:0.1,format=qcow2")
    # n2's QEMU and NBD server listen in libvirt's migration port range: refuse it there, so
    # the migration fails after n2's libvirtd has started the incoming domain.
    n2 = cluster.harness.node("n2")
    reject = ["-p", "tcp", "--dport", "49152:49215", "-j", "REJECT"]
    await asyncio.to_thread(
        subprocess.run, [*n2.wrap, "iptables", "-I", "INPUT", *reject], check=True
    )
    try:
        command = migrate(vmid, "n2", online=True, with_local_disks=True)
        state = await task_end(bus, await ask(bus, "n1", compute.GUEST_MIGRATE, command), 180)
    finally:
        await asyncio.to_thread(
            subprocess.run, [*n2.wrap, "iptables", "-D", "INPUT", *reject], check=True
        )
    assert state.exitstatus != "OK"

    record = await GuestRegistry(bus).get(vmid)
    assert (record.node, record.lock) == ("n1", None)
    assert cluster.domains("n1") == {name: True}
    assert cluster.domains("n2") == {}
    assert not list((n2.state_dir / "local").rglob(f"vm-{vmid}-*"))  # its twin disk is freed


async def test_a_stopped_guest_copies_its_local_disk_and_stays_stopped(cluster, bus, guest_image):
    vmid = 990_641
    name = f"rucher-{vmid}"
    await create(bus, vmid, guest_image, start=False, scsi0="local:0.1,format=qcow2")
    relative = Path("images") / str(vmid) / f"vm-{vmid}-disk-0.qcow2"
    source = cluster.harness.node("n1").state_dir / "local" / relative
    target = cluster.harness.node("n2").state_dir / "local" / relative

    command = migrate(vmid, "n2", with_local_disks=True)
    await finished_ok(bus, await ask(bus, "n1", compute.GUEST_MIGRATE, command))

    assert (await GuestRegistry(bus).get(vmid)).node == "n2"
    assert cluster.domains("n2") == {name: False}
    assert name not in cluster.domains("n1")
    assert target.exists() and not source.exists()
    # It crossed over paused and never ran: its console on either node is silent.
    assert guest_image.banner not in cluster.console("n1", vmid) + cluster.console("n2", vmid)
    start = compute.VmStart(command_id=new_id(), vmid=vmid, user=USER)
    await finished_ok(bus, await ask(bus, "n2", compute.GUEST_START, start))
    await until(lambda: guest_image.banner in cluster.console("n2", vmid), timeout=60)
