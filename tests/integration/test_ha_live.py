"""The live HA environment over a real nats-server: three in-process nodes, stand-in agents.

Each node runs the real cache, actions, CRM and LRM loops with its node lease held by a small
renewer (the real watchdog needs libvirt and a guard process; the harness tests run it). Each
node's stand-in compute agent answers status, start and stop on the bus and checks the fencing
token and the registry's owner like the real one. A node "dies" when its lease stops being
renewed and its loops stop: its guests must be recovered on the others, each exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from rucher.bus import Bus, RucherError
from rucher.claims import KvClaimStore
from rucher.guests import GuestRegistry
from rucher.ha.config import FenceHookSettings
from rucher.ha.env import NoRoomError
from rucher.ha.live.actions import ClusterActions
from rucher.ha.live.cache import ClusterCache, node_holder
from rucher.ha.live.settings import LiveSettings
from rucher.ha.service import HaService
from rucher.haconfig import HaConfigStore
from rucher.leases import (
    Lease,
    check_token,
    ensure_node_lease_bucket,
    lease_bucket,
    node_lease_name,
)
from rucher.proto import compute
from rucher.proto.cluster import CpuArch, NodeCapacity
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType
from rucher.proto.ha import HaResource, HaResources, ServiceState
from rucher.proto.keys import make_key
from rucher.proto.task import TaskAccepted, TaskState, TaskStatus
from rucher.tasks import TaskStore, UpidMinter

from .buses import connected, until

pytestmark = pytest.mark.integration

NODES = ("n1", "n2", "n3")
TTL = 3.0
SETTINGS = LiveSettings(round_interval=0.5, min_gap=0.05)


@dataclass
class World:
    """Which node runs which guest, and every time a guest was started twice."""

    running: dict[int, set[str]] = field(default_factory=dict)
    double_runs: list[tuple[int, str, set[str]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    migrated: list[tuple[int, str]] = field(default_factory=list)


class StandInAgent:
    """A node's compute agent reduced to status, start and stop, checking tokens and owner."""

    def __init__(self, bus: Bus, world: World) -> None:
        self.bus = bus
        self.node = bus.node
        self.world = world
        self.tasks = TaskStore(bus)
        self.minter = UpidMinter(self.node)
        self.registry = GuestRegistry(bus)
        self.alive = True

    async def serve(self) -> None:
        """Answer on this node's subjects."""
        await self.bus.serve(compute.GUEST_STATUS, self.status, node=self.node)
        await self.bus.serve(compute.GUEST_START, self.start, node=self.node)
        await self.bus.serve(compute.GUEST_STOP, self.stop, node=self.node)
        await self.bus.serve(compute.GUEST_SHUTDOWN, self.shutdown, node=self.node)
        await self.bus.serve(compute.GUEST_MIGRATE, self.migrate, node=self.node)

    async def _owned(self, vmid: int) -> None:
        if not self.alive:
            raise RucherError(ErrorCode.UNAVAILABLE, "dead")
        record = await self.registry.get(vmid)
        if record.node != self.node:
            raise RucherError(ErrorCode.NOT_FOUND, f"VM {vmid} is not on {self.node}")

    async def status(self, query: compute.VmStatusQuery, _: object) -> compute.VmStatusReport:
        await self._owned(query.vmid)
        running = self.node in self.world.running.get(query.vmid, set())
        state = PowerState.RUNNING if running else PowerState.STOPPED
        return compute.VmStatusReport(vmid=query.vmid, status=state)

    async def _done(self, kind: str, vmid: int) -> TaskAccepted:
        upid = self.minter.mint(kind, str(vmid), "root@pam")
        await self.tasks.create(
            TaskState(
                upid=str(upid),
                node=self.node,
                pid=upid.pid,
                pstart=upid.pstart,
                starttime=upid.starttime,
                type=kind,
                id=str(vmid),
                user="root@pam",
                worker="test",
                status=TaskStatus.STOPPED,
                exitstatus="OK",
            )
        )
        return TaskAccepted(upid=str(upid))

    async def start(self, command: compute.VmStart, _: object) -> TaskAccepted:
        await self._owned(command.vmid)
        assert command.fence_lease == node_lease_name(self.node)
        assert command.fence_epoch is not None
        try:
            await check_token(
                self.bus,
                make_key(command.fence_lease),
                command.fence_epoch,
                lease_bucket(command.fence_lease),
            )
        except RucherError:
            self.world.refused.append(f"{self.node}:{command.vmid}")
            raise
        nodes = self.world.running.setdefault(command.vmid, set())
        if nodes - {self.node}:
            self.world.double_runs.append((command.vmid, self.node, set(nodes)))
        nodes.add(self.node)
        return await self._done("qmstart", command.vmid)

    async def stop(self, command: compute.VmStop, _: object) -> TaskAccepted:
        await self._owned(command.vmid)
        self.world.running.get(command.vmid, set()).discard(self.node)
        return await self._done("qmstop", command.vmid)

    async def shutdown(self, command: compute.VmShutdown, _: object) -> TaskAccepted:
        await self._owned(command.vmid)
        self.world.running.get(command.vmid, set()).discard(self.node)
        return await self._done("qmshutdown", command.vmid)

    async def migrate(self, command: compute.VmMigrate, _: object) -> TaskAccepted:
        """A live migration: the target owns and runs the guest, this node no longer does."""
        await self._owned(command.vmid)
        await self.registry.transfer(command.vmid, from_node=self.node, to_node=command.target)
        nodes = self.world.running.setdefault(command.vmid, set())
        if command.online and self.node in nodes:
            nodes.discard(self.node)
            nodes.add(command.target)
        self.world.migrated.append((command.vmid, command.target))
        return await self._done("qmigrate", command.vmid)


@dataclass
class LiveNode:
    """One in-process node: its lease, cache, service and stand-in agent."""

    name: str
    bus: Bus
    lease: Lease
    cache: ClusterCache
    service: HaService
    agent: StandInAgent

    def epoch(self) -> int | None:
        """The node lease's token while held."""
        return self.lease.token if self.lease.held else None

    async def die(self, world: World) -> None:
        """Stop renewing and acting, and lose the node's guests (as a crash does)."""
        self.agent.alive = False
        await self.lease._stop_keeper()
        await self.service.stop()
        await self.cache.stop()
        for nodes in world.running.values():
            nodes.discard(self.name)

    async def go_down(self, *, reboot: bool) -> bool:
        """A clean node shutdown (SIGTERM): the shutdown policy, then the lease given back."""
        applied = await self.service.shut_down(reboot=reboot, timeout=TTL * 4)
        await self.service.stop()
        await self.cache.stop()
        await self.lease.release()
        self.agent.alive = False
        return applied


@contextlib.asynccontextmanager
async def live_node(
    url: str, name: str, world: World, settings: LiveSettings = SETTINGS
) -> AsyncIterator[LiveNode]:
    """Start one node's HA parts."""
    async with (
        connected(url, node=name, service="ha") as bus,
        connected(url, node=name, service="compute") as agent_bus,
    ):
        agent = StandInAgent(agent_bus, world)
        await agent.serve()
        await ensure_node_lease_bucket(bus, name)
        lease = Lease.named(bus, node_lease_name(name), holder=node_holder(name), ttl=TTL)
        assert await lease.try_acquire()
        lease.keep(every=0.3)
        cache = ClusterCache(bus)
        await cache.start()
        node: LiveNode | None = None

        def epoch() -> int | None:
            return node.epoch() if node is not None else None

        actions = ClusterActions(bus, lease_ttl=TTL, epoch=epoch, task_timeout=10)
        service = HaService(node=name, cache=cache, actions=actions, epoch=epoch, settings=settings)
        node = LiveNode(name, bus, lease, cache, service, agent)
        await service.start()
        try:
            yield node
        finally:
            await service.stop()
            await cache.stop()
            await lease.release()


async def test_guests_of_a_dead_node_run_again_elsewhere_exactly_once(nats_server):
    world = World()
    base = 800_000 + secrets.randbelow(90_000)
    vmids = [base + i for i in range(4)]
    async with contextlib.AsyncExitStack() as stack:
        nodes = {
            name: await stack.enter_async_context(live_node(nats_server.url, name, world))
            for name in NODES
        }
        bus = nodes["n3"].bus
        registry = GuestRegistry(bus)
        for index, vmid in enumerate(vmids):
            await registry.register(
                guest_type=GuestType.QEMU,
                node=NODES[index % 2],  # n1 and n2
                config={"memory": "128"},
                vmid=vmid,
                lock=None,
            )
        await HaConfigStore(bus).change_resources(
            lambda _: HaResources(resources={f"vm:{v}": HaResource(sid=f"vm:{v}") for v in vmids})
        )

        def all_started() -> bool:
            return all(len(world.running.get(v, set())) == 1 for v in vmids)

        await until(all_started, timeout=30, every=0.1)
        status = await HaConfigStore(bus).manager_status()
        assert status is not None
        assert {s.state for s in status.service_status.values()} == {ServiceState.STARTED}
        on_n1 = [v for v in vmids if world.running[v] == {"n1"}]
        assert len(on_n1) == 2

        killed = time.monotonic()
        await nodes["n1"].die(world)

        def recovered() -> bool:
            return all(world.running.get(v, set()) & {"n2", "n3"} for v in on_n1)

        took = await until(recovered, timeout=TTL * 5, every=0.05)
        # Not before the dead node's lease expired, which is the proof it is fenced.
        assert time.monotonic() - killed >= TTL - 0.6 - 0.1
        assert took < TTL * 3
        assert world.double_runs == []
        for vmid in on_n1:
            record = await registry.get(vmid)
            assert record.node in ("n2", "n3") and world.running[vmid] == {record.node}

        async def published() -> bool:
            status = await HaConfigStore(bus).manager_status()
            return status is not None and all(
                status.service_status[f"vm:{v}"].node != "n1"
                and status.service_status[f"vm:{v}"].state is ServiceState.STARTED
                for v in on_n1
            )

        await until(published, timeout=10, every=0.1)


def node_capacity(node: str, memory_mib: int) -> NodeCapacity:
    """A node's published capacity with ``memory_mib`` of memory."""
    return NodeCapacity(
        node=node,
        arch=CpuArch.X86_64,
        cpu_model="test",
        cpus=8,
        sockets=1,
        memory_total=memory_mib << 20,
        memory_used=0,
        time=time.time(),
    )


async def test_recoveries_claim_their_room_skip_a_full_node_and_never_overcommit(nats_server):
    world = World()
    base = 800_000 + secrets.randbelow(90_000)
    first, second, resident = base, base + 1, base + 2
    async with contextlib.AsyncExitStack() as stack:
        nodes = {
            name: await stack.enter_async_context(live_node(nats_server.url, name, world))
            for name in NODES
        }
        # n2 (first by name among equal scores) is full with a guest outside HA; n3 has room
        # for exactly one of the two 768 MiB guests that run on n1.
        for node in nodes.values():
            node.service.capacity_published(node_capacity("n2", 1024))
            node.service.capacity_published(node_capacity("n3", 1024))
        bus = nodes["n3"].bus
        registry = GuestRegistry(bus)
        for vmid, node, memory in ((first, "n1", 768), (second, "n1", 768), (resident, "n2", 512)):
            await registry.register(
                guest_type=GuestType.QEMU,
                node=node,
                config={"memory": str(memory)},
                vmid=vmid,
                lock=None,
            )
        await HaConfigStore(bus).change_resources(
            lambda _: HaResources(
                resources={f"vm:{v}": HaResource(sid=f"vm:{v}") for v in (first, second)}
            )
        )
        await until(
            lambda: all(world.running.get(v) == {"n1"} for v in (first, second)),
            timeout=30,
            every=0.1,
        )
        await nodes["n1"].die(world)

        def one_recovered() -> bool:
            return any("n3" in world.running.get(v, set()) for v in (first, second))

        await until(one_recovered, timeout=TTL * 5, every=0.05)
        store = KvClaimStore(bus)

        async def confirmed_on_n3() -> bool:
            document, _ = await store.read("n3")
            return document is not None and any(c.confirmed for c in document.claims)

        await until(confirmed_on_n3, timeout=10, every=0.1)
        await asyncio.sleep(TTL)  # further rounds: the other guest still finds no room
        [moved] = [v for v in (first, second) if world.running.get(v)]
        stuck = second if moved == first else first
        assert world.running[moved] == {"n3"} and not world.running.get(stuck)
        assert world.double_runs == []
        document, _ = await store.read("n3")
        assert document is not None
        [claim] = document.claims
        assert claim.vmid == moved and claim.scheduler == "ha" and claim.confirmed
        assert claim.resources.memory == 768 << 20
        full, _ = await store.read("n2")
        assert full is None or full.claims == ()
        assert (await registry.get(stuck)).node in ("n1", "n2", "n3")
        status = await HaConfigStore(bus).manager_status()
        assert status is not None
        assert status.service_status[f"vm:{stuck}"].state is ServiceState.RECOVERY


async def test_a_migration_claims_room_on_its_target_and_gives_it_back_when_refused(nats_server):
    vmid = 800_000 + secrets.randbelow(90_000)
    async with (
        connected(nats_server.url, node="m1", service="ha") as bus,
        connected(nats_server.url, node="m1", service="compute") as agent_bus,
    ):
        await GuestRegistry(bus).register(
            guest_type=GuestType.QEMU, node="m1", config={"memory": "768"}, vmid=vmid, lock=None
        )
        actions = ClusterActions(bus, lease_ttl=TTL, epoch=lambda: 1)
        store = KvClaimStore(bus)
        with pytest.raises(NoRoomError):
            await actions.migrate(vmid, "m2", True, capacity=node_capacity("m2", 512), guests={})
        assert (await store.read("m2"))[0] is None

        asked: list[compute.VmMigrate] = []

        async def refuse(command: compute.VmMigrate, _: object) -> TaskAccepted:
            asked.append(command)
            document, _revision = await store.read("m2")
            assert document is not None and [c.claim_id for c in document.claims] == [
                command.claim_id
            ]
            raise RucherError(ErrorCode.CONFLICT, "VM is locked (migrate)")

        await agent_bus.serve(compute.GUEST_MIGRATE, refuse, node="m1")
        with pytest.raises(RucherError):
            await actions.migrate(vmid, "m2", True, capacity=node_capacity("m2", 1024), guests={})
        [command] = asked
        assert command.claim_id is not None and command.claim_token > 0
        document, _ = await store.read("m2")
        assert document is not None and document.claims == ()


async def test_with_a_fence_hook_a_node_is_fenced_once_its_lease_expired_and_the_hook_succeeded(
    nats_server, tmp_path
):
    marker = tmp_path / "powered-off-d1"
    async with connected(nats_server.url, node="m1", service="ha") as bus:
        # The dead node still holds its lease: no fence, and the hook is not even tried.
        for node in ("d1", "d2"):
            await ensure_node_lease_bucket(bus, node)
        held = Lease.named(bus, node_lease_name("d1"), holder=node_holder("d1"), ttl=2.0)
        assert await held.try_acquire()
        hook = FenceHookSettings(command=("touch", str(tmp_path / "powered-off-{node}")), timeout=5)
        actions = ClusterActions(bus, lease_ttl=2.0, epoch=lambda: None, fence_hook=hook)
        assert not await actions.fence("d1")
        assert not marker.exists()

        # Expired: the lease is taken, then the fence waits for the hook's success.
        await until(lambda: actions.fence("d1"), timeout=10, every=0.1)
        assert marker.read_text() == ""  # the hook ran for d1
        assert actions.fence_token("d1") > (held.token or 0)

        # A hook that fails keeps the node unfenced, however often the manager asks.
        failing = ClusterActions(
            bus,
            lease_ttl=2.0,
            epoch=lambda: None,
            fence_hook=FenceHookSettings(command=("false",), timeout=5),
        )
        second = Lease.named(bus, node_lease_name("d2"), holder=node_holder("d2"), ttl=2.0)
        assert await second.try_acquire()
        await second.release()
        for _ in range(20):
            assert not await failing.fence("d2")
            await asyncio.sleep(0.05)


async def _guests_on_n1_and_n2(
    stack: contextlib.AsyncExitStack, url: str, world: World, policy: str
) -> tuple[dict[str, LiveNode], list[int], list[int]]:
    """Three nodes under ``policy``, four HA guests started on n1 and n2; those on n1."""
    settings = dataclasses.replace(SETTINGS, shutdown_policy=policy)
    nodes = {
        name: await stack.enter_async_context(live_node(url, name, world, settings))
        for name in NODES
    }
    bus = nodes["n3"].bus
    base = 800_000 + secrets.randbelow(90_000)
    vmids = [base + i for i in range(4)]
    for index, vmid in enumerate(vmids):
        await GuestRegistry(bus).register(
            guest_type=GuestType.QEMU,
            node=NODES[index % 2],
            config={"memory": "128"},
            vmid=vmid,
            lock=None,
        )
    await HaConfigStore(bus).change_resources(
        lambda _: HaResources(resources={f"vm:{v}": HaResource(sid=f"vm:{v}") for v in vmids})
    )
    await until(
        lambda: all(len(world.running.get(v, set())) == 1 for v in vmids), timeout=30, every=0.1
    )
    return nodes, vmids, [v for v in vmids if world.running[v] == {"n1"}]


@pytest.mark.parametrize(("policy", "reboot"), [("freeze", False), ("conditional", True)])
async def test_a_node_going_down_under_freeze_stops_and_freezes_its_guests(
    nats_server, policy, reboot
):
    world = World()
    async with contextlib.AsyncExitStack() as stack:
        nodes, vmids, on_n1 = await _guests_on_n1_and_n2(stack, nats_server.url, world, policy)
        assert len(on_n1) == 2
        assert await nodes["n1"].go_down(reboot=reboot)
        store = HaConfigStore(nodes["n3"].bus)

        async def frozen() -> bool:
            status = await store.manager_status()
            return status is not None and all(
                status.service_status[f"vm:{v}"].state is ServiceState.FREEZE
                and status.service_status[f"vm:{v}"].node == "n1"
                for v in on_n1
            )

        await until(frozen, timeout=10, every=0.1)
        # Well past the lease's TTL: frozen guests are never recovered elsewhere.
        await asyncio.sleep(TTL * 2)
        assert await frozen()
        for vmid in on_n1:
            assert world.running.get(vmid, set()) == set()
            assert (await GuestRegistry(nodes["n3"].bus).get(vmid)).node == "n1"
        others = [v for v in vmids if v not in on_n1]
        assert all(world.running[v] == {"n2"} for v in others)
        assert world.double_runs == [] and world.refused == []


@pytest.mark.parametrize(("policy", "reboot"), [("failover", False), ("conditional", False)])
async def test_a_node_going_down_under_failover_has_its_guests_recovered_elsewhere_once(
    nats_server, policy, reboot
):
    world = World()
    async with contextlib.AsyncExitStack() as stack:
        nodes, _, on_n1 = await _guests_on_n1_and_n2(stack, nats_server.url, world, policy)
        assert len(on_n1) == 2
        assert await nodes["n1"].go_down(reboot=reboot)
        assert all(world.running[v] == set() for v in on_n1), "stopped before the lease went"

        def recovered() -> bool:
            return all(world.running.get(v, set()) & {"n2", "n3"} for v in on_n1)

        took = await until(recovered, timeout=TTL * 5, every=0.05)
        # The lease was given back cleanly: no waiting for it to run out.
        assert took < TTL / 2
        assert world.double_runs == []
        registry = GuestRegistry(nodes["n3"].bus)
        for vmid in on_n1:
            record = await registry.get(vmid)
            assert record.node in ("n2", "n3") and world.running[vmid] == {record.node}


async def test_a_node_going_down_under_migrate_moves_its_guests_away_live(nats_server):
    world = World()
    async with contextlib.AsyncExitStack() as stack:
        nodes, vmids, on_n1 = await _guests_on_n1_and_n2(stack, nats_server.url, world, "migrate")
        assert len(on_n1) == 2
        assert await nodes["n1"].go_down(reboot=False)
        # Moved while running, before the lease went: never stopped, never recovered.
        assert sorted(v for v, _ in world.migrated) == sorted(on_n1)
        registry = GuestRegistry(nodes["n3"].bus)
        for vmid in on_n1:
            record = await registry.get(vmid)
            assert record.node in ("n2", "n3") and world.running[vmid] == {record.node}
        assert world.double_runs == []
        store = HaConfigStore(nodes["n3"].bus)

        async def started_elsewhere() -> bool:
            status = await store.manager_status()
            return status is not None and all(
                status.service_status[f"vm:{v}"].state is ServiceState.STARTED
                and status.service_status[f"vm:{v}"].node != "n1"
                for v in vmids
            )

        await until(started_elsewhere, timeout=10, every=0.1)
