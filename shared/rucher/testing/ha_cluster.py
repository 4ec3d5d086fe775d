"""A real HA cluster on the multi-node harness, for the failover tests and ops/bench/failover.py.

Every node runs its own nats-server, libvirtd, storage service, compute agent and HA service;
one Ceph on the harness bridge is the shared ``ceph`` rbd storage. HA guests are the small
direct-kernel-boot test guest (``ops/build-guest``) with an RBD disk, made HA through the ``ha``
bucket as the gateway would. A :class:`~rucher.testing.qemu_checker.QemuChecker` watches every
QEMU process on the machine, independently of the bus, from :meth:`HaCluster.start` on.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.haconfig import HaConfigStore
from rucher.leases import current, node_lease_key
from rucher.proto import compute
from rucher.proto import storage as s
from rucher.proto.errors import ErrorCode
from rucher.proto.ha import HaResource, HaResources
from rucher.proto.streams import node_lease_bucket
from rucher.proto.task import TaskStatus
from rucher.tasks import TaskStore
from rucher.testing.harness import Harness
from rucher.testing.harness_node import Node
from rucher.testing.qemu_checker import QemuChecker, boottime, netns_inode

USER = "root@pam"
GUEST_MEMORY_MIB = 128
# Fast registrations so agents of a restarted node are found again quickly.
SERVICE_ENV = {"RUCHER_REGISTRY_TTL": "3", "RUCHER_LOG_LEVEL": "info"}
COMPUTE_ENV = {"RUCHER_COMPUTE_SHUTDOWN_TIMEOUT": "20"}


def guest_name(vmid: int) -> str:
    """The libvirt domain (and QEMU ``-name guest=``) of a VMID."""
    return f"rucher-{vmid}"


@dataclass
class Failover:
    """One guest's move after its node was killed at ``killed`` (boottime seconds)."""

    vmid: int
    source: str
    killed: float
    target: str | None = None
    started: float | None = None

    @property
    def seconds(self) -> float | None:
        """Kill → the guest's QEMU started on another node, as the checker saw it."""
        return None if self.started is None else self.started - self.killed


@dataclass
class HaCluster:
    """The harness with every service running and the checker recording."""

    harness: Harness
    kernel: Path
    initrd: Path
    cmdline: str
    ha_env: dict[str, str] = field(default_factory=dict)
    checker: QemuChecker | None = None
    vmids: list[int] = field(default_factory=list)

    # --- building --------------------------------------------------------------------------

    def start_services(self) -> None:
        """Start storage, compute and HA on every node (in that order, restarted in it too).

        The first storage service provisions the streams and buckets alone: services that
        provision the same new streams at once on a cluster race (``stream not found``).
        """
        python = [sys.executable, "-m"]
        first = self.harness.nodes[0]
        log_file = first.log_dir / "storage.log"
        first.start_service(
            "storage",
            [*python, "rucher.storage"],
            dict(SERVICE_ENV),
            ready=lambda: log_file.is_file() and "service_started" in log_file.read_text(),
        )
        for node in self.harness.nodes:
            if node is not first:
                node.start_service("storage", [*python, "rucher.storage"], dict(SERVICE_ENV))
            node.start_service("compute", [*python, "rucher.compute"], SERVICE_ENV | COMPUTE_ENV)
            node.start_service("ha", [*python, "rucher.ha"], SERVICE_ENV | self.ha_env)

    def start_checker(self) -> QemuChecker:
        """Record every QEMU process of every node from now on."""
        nodes = {netns_inode(node.namespace): node.name for node in self.harness.nodes}
        self.checker = QemuChecker(
            nodes, guests=lambda name: name in {guest_name(v) for v in self.vmids}
        ).start()
        return self.checker

    async def wait_agents(self, bus: Bus, nodes: Iterable[Node] | None = None) -> None:
        """Until every node's compute agent and storage service answer (Ceph defined)."""
        for node in nodes or self.harness.nodes:
            deadline = time.monotonic() + 120
            while not await _answers(bus, node.name):
                if time.monotonic() > deadline:
                    tails = [node.processes[name].tail_log(8) for name in ("storage", "compute")]
                    raise TimeoutError(f"{node.name}: agents did not answer\n" + "\n".join(tails))
                await asyncio.sleep(0.3)

    async def wait_ha_lease(self, bus: Bus, node: str, timeout: float = 60.0) -> None:
        """Until ``node``'s HA service holds its node lease."""
        deadline = time.monotonic() + timeout
        key, bucket = node_lease_key(node), node_lease_bucket(node)
        while True:
            try:
                record = await current(bus, key, bucket)
            except RucherError:
                record = None  # the node's lease bucket is not made yet
            if record is not None and record.holder == f"{node}/ha" and record.token > 0:
                return
            if time.monotonic() > deadline:
                tail = self.harness.node(node).processes["ha"].tail_log(12)
                raise TimeoutError(f"{node}: the HA service never held its lease\n{tail}")
            await asyncio.sleep(0.2)

    async def create_guest(self, bus: Bus, vmid: int, node: str) -> None:
        """Create the test guest on ``node`` with an RBD disk (stopped)."""
        config = {
            "name": f"ha-{vmid}",
            "memory": str(GUEST_MEMORY_MIB),
            "serial0": "socket",
            "vga": "serial0",
            "scsi0": "ceph:0.05",
            "args": f"-kernel {self.kernel} -initrd {self.initrd} -append '{self.cmdline}'",
        }
        command = compute.VmCreate(command_id=new_id(), vmid=vmid, user=USER, config=config)
        reply = await bus.request(compute.GUEST_CREATE.to(node=node), command, timeout=60)
        await task_ok(bus, reply.upid)
        self.vmids.append(vmid)

    async def make_ha(self, bus: Bus, vmids: Iterable[int]) -> None:
        """Add the guests as HA resources (requested state ``started``)."""
        sids = [f"vm:{vmid}" for vmid in vmids]

        def add(document: HaResources) -> HaResources:
            return HaResources(
                resources={**document.resources, **{sid: HaResource(sid=sid) for sid in sids}}
            )

        await HaConfigStore(bus).change_resources(add)

    # --- observing -------------------------------------------------------------------------

    def placement(self, vmid: int) -> set[str]:
        """The nodes running ``vmid`` now, by the checker."""
        assert self.checker is not None
        return self.checker.running().get(guest_name(vmid), set())

    async def wait_running(
        self, vmids: Iterable[int], timeout: float = 120.0, on: set[str] | None = None
    ) -> dict[int, str]:
        """Until each guest runs on exactly one node (one of ``on``); that node per guest."""
        wanted = list(vmids)
        deadline = time.monotonic() + timeout
        while True:
            where = {vmid: self.placement(vmid) for vmid in wanted}
            if all(len(nodes) == 1 and (on is None or nodes <= on) for nodes in where.values()):
                return {vmid: next(iter(nodes)) for vmid, nodes in where.items()}
            if time.monotonic() > deadline:
                raise TimeoutError(f"guests not running once each: {where}")
            await asyncio.sleep(0.1)

    def moved_after(self, failover: Failover) -> bool:
        """Whether the guest started on another node after the kill (fills in the failover)."""
        assert self.checker is not None
        for node, start, _end in self.checker.log.placements(guest_name(failover.vmid)):
            if node != failover.source and start >= failover.killed - 0.05:
                failover.target, failover.started = node, start
                return True
        return False

    async def kill_and_measure(
        self, node: str, vmids: Iterable[int], timeout: float = 60.0
    ) -> list[Failover]:
        """Kill every process of ``node``; wait until its guests run elsewhere; the times."""
        killed = boottime()
        await asyncio.to_thread(self.harness.kill, node)
        moves = [Failover(vmid=vmid, source=node, killed=killed) for vmid in vmids]
        deadline = time.monotonic() + timeout
        while not all(self.moved_after(move) for move in moves):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return moves

    def history(self, vmids: Iterable[int]) -> dict[int, list[tuple[str, float, float]]]:
        """Where and when each guest ran (boottime seconds), for failure messages."""
        assert self.checker is not None
        return {vmid: self.checker.log.placements(guest_name(vmid)) for vmid in vmids}

    def double_runs(self) -> list[str]:
        """Every time a guest ran on two nodes at once."""
        assert self.checker is not None
        return [str(run) for run in self.checker.double_runs()]

    def logs(self, node: str, name: str = "ha", lines: int = 60) -> str:
        """The end of a node's service log."""
        return self.harness.node(node).processes[name].tail_log(lines)


async def _answers(bus: Bus, node: str) -> bool:
    try:
        await bus.request(
            compute.GUEST_STATUS.to(node=node), compute.VmStatusQuery(vmid=999_999_998), timeout=2
        )
    except RucherError as err:
        if err.code is not ErrorCode.NOT_FOUND:
            return False
    try:
        status = await bus.request(s.STATUS.to(node=node), s.StorageStatusQuery(), timeout=2)
    except RucherError:
        return False
    return any(entry.storage == "ceph" and entry.active for entry in status.storages)


async def task_ok(bus: Bus, upid: str, timeout: float = 120.0) -> None:
    """Wait for a task and require it to have succeeded."""
    store = TaskStore(bus)
    deadline = time.monotonic() + timeout
    while True:
        state = await store.get(upid)
        if state.status is TaskStatus.STOPPED:
            if state.exitstatus != "OK":
                raise RuntimeError(f"task {upid} failed: {state.exitstatus}")
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {upid} still running")
        await asyncio.sleep(0.1)
