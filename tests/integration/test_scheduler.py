"""The scheduler service against a real nats-server: placement, claims, expiry, take-over."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from rucher.bus import KV, Bus, RucherError
from rucher.bus.client import new_id
from rucher.bus.codec import encode
from rucher.leases import current
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished, CpuArch, NodeCapacity
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import (
    INVENTORY_PUBLISHED,
    GpuInventory,
    GpuKind,
    InventoryPublished,
    MigPlacement,
    MigProfile,
    PciDevice,
    PciMapping,
    PciMappingEntry,
)
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.ha import (
    MANAGER_STATUS_PUBLISHED,
    ManagerStatus,
    ManagerStatusPublished,
    NodeState,
)
from rucher.proto.keys import encode_token, make_key
from rucher.proto.node import LeaseRecord, ServiceInstance
from rucher.proto.scheduler import (
    CLAIM_CONFIRM,
    CLAIM_ENDED,
    CLAIM_RELEASE,
    GUEST_PLACE,
    REBALANCE_PLAN,
    Claim,
    ClaimConfirm,
    ClaimEnd,
    ClaimEnded,
    ClaimRelease,
    GpuRequest,
    NodeAllocations,
    PlaceGuest,
    PlacementSpec,
    PlanRebalance,
    ResourceRequest,
)
from rucher.proto.storage import (
    STATUS_PUBLISHED,
    StorageStatus,
    StorageStatusPublished,
    StorageType,
)
from rucher.proto.streams import ALLOCATIONS, CLAIMS, GUESTS, MAPPINGS, SERVICES
from rucher.scheduler.reaper import ELECTION

from .buses import connected, until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def start_scheduler(
    urls: str | list[str], state: Path, node: str = "s1", **env: str
) -> subprocess.Popen[bytes]:
    """The scheduler as a process of its own, logging to ``state/scheduler-{node}.log``."""
    state.mkdir(parents=True, exist_ok=True)
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RUCHER_")},
        "RUCHER_NATS_URL": urls if isinstance(urls, str) else ",".join(urls),
        "RUCHER_NODE": node,
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_REGISTRY_TTL": "3",
        "RUCHER_LOG_FORMAT": "json",
        "RUCHER_LOG_LEVEL": "info",
        "RUCHER_SCHEDULER_SWEEP": "0.25",
        "RUCHER_SCHEDULER_CLAIM_GRACE": "0.25",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "rucher.scheduler"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=(state / f"scheduler-{node}.log").open("wb"),
        start_new_session=True,
    )


async def wait_ready(bus: Bus, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once a scheduler answers (its view is loaded by then)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the scheduler exited with {process.returncode}")
        try:
            await bus.request(REBALANCE_PLAN.address, PlanRebalance(max_moves=1), timeout=2.0)
        except RucherError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            return


async def wait_serving(bus: Bus, count: int, timeout: float = 30.0) -> None:
    """Return once ``count`` scheduler processes answer a ping (each has loaded its view)."""
    deadline = time.monotonic() + timeout
    while True:
        answers: set[bytes] = set()
        inbox = bus.nc.new_inbox()

        async def collect(msg: Msg, answers: set[bytes] = answers) -> None:
            if msg.data:  # "no responders" comes back as an empty status message
                answers.add(msg.data)

        subscription = await bus.nc.subscribe(inbox, cb=collect)
        await bus.nc.publish("$SRV.PING.scheduler", b"", reply=inbox)
        await asyncio.sleep(0.3)
        await subscription.unsubscribe()
        if len({json.loads(answer)["id"] for answer in answers}) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(answers)} of {count} schedulers answer")


def stop(process: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL) the process and wait for it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


async def add_nodes(
    bus: Bus, nodes: Iterable[str], *, cpus: int = 8, memory: int = 16 * GIB
) -> None:
    """Nodes as their agents announce them: a compute agent registered, capacity published."""
    registry: KV[LeaseRecord] = KV(bus, SERVICES, LeaseRecord)
    for node in nodes:
        instance = ServiceInstance(
            service="compute", node=node, instance="agent", version="0", address="", pid=1,
            started=time.time(),
        )  # fmt: skip
        record = LeaseRecord(
            holder="agent", token=1, ttl=3600, renewed=time.time(), info=encode(instance)
        )
        await registry.put(make_key("compute", node, "agent"), record)
        capacity = NodeCapacity(
            node=node, arch=CpuArch.X86_64, cpu_model="test", cpus=cpus, sockets=1,
            memory_total=memory, memory_used=0, time=time.time(),
        )  # fmt: skip
        event = CapacityPublished(event_id=new_id(), node=node, time=time.time(), capacity=capacity)
        await bus.publish(NODE_CAPACITY_PUBLISHED.to(node=node), event)


def place(vmid: int, memory: int = 4 * GIB, ttl: float = 30.0, **spec: object) -> PlaceGuest:
    return PlaceGuest(
        command_id=new_id(),
        spec=PlacementSpec(
            vmid=vmid,
            guest_type=GuestType.QEMU,
            resources=ResourceRequest(vcpus=1, memory=memory),
            **spec,  # type: ignore[arg-type]
        ),
        claim_ttl=ttl,
    )


async def allocations(bus: Bus, node: str) -> NodeAllocations | None:
    entry = await KV(bus, ALLOCATIONS, NodeAllocations).get(encode_token(node))
    return entry.value if entry else None


async def pending(bus: Bus, node: str) -> list[Claim]:
    document = await allocations(bus, node)
    return [c for c in document.claims if not c.confirmed] if document else []


async def request_until_placed(bus: Bus, command: PlaceGuest, timeout: float = 10.0):
    """Ask until the scheduler has seen the nodes (events arrive a little after publishing)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await bus.request(GUEST_PLACE.address, command)
        except RucherError as err:
            if time.monotonic() > deadline or (
                err.code is ErrorCode.INVALID and "no node" not in err.message
            ):
                raise
            await asyncio.sleep(0.1)


async def ended(bus: Bus) -> AsyncIterator[ClaimEnded]:
    """Every claim_ended event from now on."""
    queue: asyncio.Queue[ClaimEnded] = asyncio.Queue()

    async def on_msg(msg) -> None:
        from rucher.bus.codec import decode

        await queue.put(decode(msg.data, ClaimEnded))

    sub = await bus.nc.subscribe(CLAIM_ENDED.wildcard(), cb=on_msg)
    try:
        while True:
            yield await queue.get()
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def stack(nats_server, tmp_path) -> AsyncIterator[tuple[Bus, subprocess.Popen[bytes]]]:
    async with connected(nats_server.url, service="test-client") as bus:
        await add_nodes(bus, ("n1", "n2", "n3"))
        process = start_scheduler(nats_server.url, tmp_path / "state")
        try:
            await wait_ready(bus, process)
            yield bus, process
        finally:
            stop(process)


@pytest.fixture(params=["server", "cluster"])
async def any_stack(request, tmp_path) -> AsyncIterator[tuple[Bus, subprocess.Popen[bytes]]]:
    """The scheduler on one nats-server, or on a 3-node JetStream cluster (R3 buckets)."""
    if request.param == "server":
        urls = [request.getfixturevalue("nats_server").url]
    else:
        urls = request.getfixturevalue("nats_cluster").urls
    async with connected(urls, service="test-client", replicas=len(urls)) as bus:
        await add_nodes(bus, ("n1", "n2", "n3"))
        process = start_scheduler(urls, tmp_path / "state", RUCHER_JS_REPLICAS=str(len(urls)))
        try:
            await wait_ready(bus, process)
            yield bus, process
        finally:
            stop(process)


async def test_a_placement_claims_room_on_the_chosen_node(any_stack):
    bus, _ = any_stack
    decision = await request_until_placed(bus, place(101))
    placement = decision.placement
    assert placement.node in {"n1", "n2", "n3"} and placement.vmid == 101
    assert decision.filters[0].filter == "online"
    [claim] = await pending(bus, placement.node)
    assert claim.claim_id == placement.claim_id and claim.token == placement.claim_token
    record = await KV(bus, CLAIMS, Claim).get(placement.claim_id)
    assert record is not None and record.revision == placement.claim_token
    # The next guest spreads to another node.
    other = await bus.request(GUEST_PLACE.address, place(102))
    assert other.placement.node != placement.node


async def test_an_impossible_or_unfitting_request_is_refused_with_the_reason(stack):
    bus, _ = stack
    await request_until_placed(bus, place(101, memory=GIB))
    with pytest.raises(RucherError) as impossible:
        await bus.request(GUEST_PLACE.address, place(102, memory=64 * GIB))
    assert impossible.value.code is ErrorCode.INVALID
    assert "more than any node has" in impossible.value.message
    for vmid in (103, 104, 105):
        await bus.request(GUEST_PLACE.address, place(vmid, memory=14 * GIB))
    with pytest.raises(RucherError) as full:
        await bus.request(GUEST_PLACE.address, place(106, memory=8 * GIB))
    assert full.value.code is ErrorCode.UNAVAILABLE
    assert "resources removed 3" in full.value.message


async def test_an_unconfirmed_claim_expires_and_its_room_comes_back(any_stack):
    bus, _ = any_stack
    endings = ended(bus)
    first = await request_until_placed(
        bus, place(101, memory=14 * GIB, ttl=1.0, candidates=("n1",))
    )
    assert first.placement.node == "n1"
    started = time.monotonic()
    event = await asyncio.wait_for(anext(endings), timeout=10)
    assert event.claim_id == first.placement.claim_id and event.outcome is ClaimEnd.EXPIRED
    assert time.monotonic() - started < 1.0 + 3.0
    assert await pending(bus, "n1") == []
    assert await KV(bus, CLAIMS, Claim).get(first.placement.claim_id) is None
    again = await bus.request(GUEST_PLACE.address, place(102, memory=14 * GIB, candidates=("n1",)))
    assert again.placement.node == "n1"
    await endings.aclose()


async def test_a_confirmed_claim_stays_and_a_release_gives_the_room_back(stack):
    bus, _ = stack
    decision = await request_until_placed(
        bus, place(101, memory=14 * GIB, ttl=2.0, candidates=("n2",))
    )
    placement = decision.placement
    confirm = ClaimConfirm(
        command_id=new_id(),
        claim_id=placement.claim_id,
        claim_token=placement.claim_token,
        node=placement.node,
        vmid=101,
    )
    await bus.request(CLAIM_CONFIRM.address, confirm)
    await asyncio.sleep(3.0)  # past the claim's TTL: confirmed, it stays
    document = await allocations(bus, "n2")
    assert document is not None and [c.confirmed for c in document.claims] == [True]
    with pytest.raises(RucherError) as full:
        await bus.request(GUEST_PLACE.address, place(102, memory=4 * GIB, candidates=("n2",)))
    assert full.value.code is ErrorCode.UNAVAILABLE
    await bus.publish(
        CLAIM_RELEASE.address,
        ClaimRelease(command_id=new_id(), claim_id=placement.claim_id, reason="guest destroyed"),
    )

    async def released() -> bool:
        doc = await allocations(bus, "n2")
        return doc is not None and not doc.claims

    await until(released, timeout=10)
    await bus.request(GUEST_PLACE.address, place(103, memory=14 * GIB, candidates=("n2",)))


async def test_claims_of_a_killed_scheduler_end_within_their_timeout(nats_server, tmp_path):
    async with connected(nats_server.url, service="test-client") as bus:
        await add_nodes(bus, ("n1", "n2"))
        processes = {
            "s1": start_scheduler(nats_server.url, tmp_path / "a", node="s1"),
            "s2": start_scheduler(nats_server.url, tmp_path / "b", node="s2"),
        }
        try:
            for process in processes.values():
                await wait_ready(bus, process)
            for vmid in range(101, 105):
                await request_until_placed(bus, place(vmid, memory=2 * GIB, ttl=3.0))
            # A scheduler dying between its two writes leaves an allocation without a record:
            # add one such claim, about to run out.
            await add_orphan(bus, "n1")

            async def leader() -> str | None:
                record = await current(bus, make_key(f"election:{ELECTION}"))
                return record.holder if record else None

            async def elected() -> bool:
                return await leader() is not None

            await until(elected, timeout=10)
            holder = await leader()
            assert holder is not None
            dead = next(node for node in processes if f".{node}." in holder)
            stop(processes[dead], kill=True)
            killed = time.monotonic()

            async def all_gone() -> bool:
                return not await pending(bus, "n1") and not await pending(bus, "n2")

            # The survivor leads within a registry TTL (3 s); the claims end with their TTL.
            await until(all_gone, timeout=15)
            assert time.monotonic() - killed < 3.0 + 3.0 + 2.0
            survivor = await leader()
            assert survivor is not None and f".{dead}." not in survivor
        finally:
            for process in processes.values():
                stop(process, kill=True)


async def add_orphan(bus: Bus, node: str) -> None:
    """Add to a node's document a claim that has no record and runs out in a second."""
    orphan = Claim(
        claim_id="orphan", node=node, vmid=199, guest_type=GuestType.QEMU,
        resources=ResourceRequest(vcpus=1, memory=GIB), token=1, created=time.time(),
        expires=time.time() + 1.0, scheduler="dead",
    )  # fmt: skip
    kv = KV(bus, ALLOCATIONS, NodeAllocations)
    while True:
        entry = await kv.get(encode_token(node))
        claims = entry.value.claims if entry and entry.value else ()
        try:
            await kv.update(
                encode_token(node),
                NodeAllocations(node=node, claims=(*claims, orphan)),
                revision=entry.revision if entry else 0,
            )
        except RucherError as err:
            if err.code is not ErrorCode.CONFLICT:
                raise
        else:
            return


async def test_the_view_follows_inventories_storages_guests_and_the_ha_manager(stack):
    bus, _ = stack
    await request_until_placed(bus, place(100, memory=GIB))
    now = time.time()
    mig = PciDevice(
        address="0000:41:00.0",
        vendor_id="10de",
        device_id="2335",
        class_code="030200",
        mig_enabled=True,
        mig_profiles=(
            MigProfile(
                profile_id=0,
                name="7g.141gb",
                slices=7,
                max_instances=1,
                memory=140 * GIB,
                placements=(MigPlacement(start=0, size=8),),
            ),
        ),
    )
    await bus.publish(
        INVENTORY_PUBLISHED.to(node="n3"),
        InventoryPublished(
            event_id=new_id(), node="n3", time=now,
            inventory=GpuInventory(node="n3", devices=(mig,), time=now),
        ),
    )  # fmt: skip
    ceph = StorageStatus(
        storage="ceph", storage_type=StorageType.RBD, content=(), shared=True, active=True,
        enabled=True,
    )  # fmt: skip
    await bus.publish(
        STATUS_PUBLISHED.to(node="n2"),
        StorageStatusPublished(event_id=new_id(), node="n2", time=now, storages=(ceph,)),
    )
    gpu = (GpuRequest(kind=GpuKind.MIG, mig_profile="7g.141gb"),)
    on_gpu = await request_until_placed(
        bus,
        PlaceGuest(
            command_id=new_id(),
            spec=PlacementSpec(
                vmid=101,
                guest_type=GuestType.QEMU,
                resources=ResourceRequest(vcpus=1, memory=GIB, gpus=gpu),
            ),
        ),
    )
    assert on_gpu.placement.node == "n3"
    on_ceph = await request_until_placed(
        bus,
        PlaceGuest(
            command_id=new_id(),
            spec=PlacementSpec(
                vmid=102,
                guest_type=GuestType.QEMU,
                resources=ResourceRequest(vcpus=1, memory=GIB, storages=("ceph",)),
            ),
        ),
    )
    assert on_ceph.placement.node == "n2"
    # A guest created without the scheduler holds its configured memory on its node.
    guests: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)
    await guests.put(
        "300",
        GuestRecord(
            vmid=300, type=GuestType.QEMU, node="n1", config={"memory": "14336"}, digest=""
        ),
    )
    # The HA manager puts n2 into maintenance.
    status = ManagerStatus(
        master_node="n1",
        manager_token=1,
        timestamp=now,
        node_status={"n1": NodeState.ONLINE, "n2": NodeState.MAINTENANCE, "n3": NodeState.ONLINE},
        service_status={},
    )
    await bus.publish(
        MANAGER_STATUS_PUBLISHED.to(node="n1"),
        ManagerStatusPublished(event_id=new_id(), node="n1", time=now, status=status),
    )

    async def closed(node: str, reason: str) -> bool:
        try:
            await bus.request(GUEST_PLACE.address, place(400, memory=4 * GIB, candidates=(node,)))
        except RucherError as err:
            return reason in err.message
        return False

    await until(lambda: closed("n2", "online removed 1"), timeout=10)
    await until(lambda: closed("n1", "resources removed 1"), timeout=10)


async def test_a_confirmed_claim_ends_when_its_guest_moves_to_another_node(stack):
    bus, _ = stack
    decision = await request_until_placed(bus, place(101, memory=4 * GIB, candidates=("n1",)))
    placement = decision.placement
    await bus.request(
        CLAIM_CONFIRM.address,
        ClaimConfirm(
            command_id=new_id(),
            claim_id=placement.claim_id,
            claim_token=placement.claim_token,
            node="n1",
            vmid=101,
        ),
    )
    guests: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)
    record = GuestRecord(vmid=101, type=GuestType.QEMU, node="n1", config={}, digest="")
    await guests.put("101", record)
    await asyncio.sleep(0.5)
    assert [c.vmid for c in (await allocations(bus, "n1")).claims] == [101]
    await guests.put("101", msgspec.structs.replace(record, node="n2"))  # migrated

    async def superseded() -> bool:
        document = await allocations(bus, "n1")
        return document is not None and document.claims == ()

    await until(superseded, timeout=10)


async def test_a_guest_that_moved_while_no_scheduler_ran_is_reconciled_at_election(
    nats_server, tmp_path
):
    async with connected(nats_server.url, service="test-client") as bus:
        await add_nodes(bus, ("n1", "n2"))
        first = start_scheduler(nats_server.url, tmp_path / "a", node="s1")
        try:
            await wait_ready(bus, first)
            decision = await request_until_placed(bus, place(101, candidates=("n1",)))
            placement = decision.placement
            await bus.request(
                CLAIM_CONFIRM.address,
                ClaimConfirm(
                    command_id=new_id(),
                    claim_id=placement.claim_id,
                    claim_token=placement.claim_token,
                    node="n1",
                    vmid=101,
                ),
            )
        finally:
            stop(first)
        guests: KV[GuestRecord] = KV(bus, GUESTS, GuestRecord)
        await guests.put(
            "101", GuestRecord(vmid=101, type=GuestType.QEMU, node="n2", config={}, digest="")
        )
        second = start_scheduler(nats_server.url, tmp_path / "b", node="s2")
        try:
            await wait_ready(bus, second)

            async def superseded() -> bool:
                document = await allocations(bus, "n1")
                return document is not None and document.claims == ()

            await until(superseded, timeout=15)
        finally:
            stop(second)


async def test_the_view_learns_pci_mappings_from_the_mappings_bucket(stack):
    bus, _ = stack
    await request_until_placed(bus, place(100, memory=GIB))
    now = time.time()
    device = PciDevice(
        address="0000:81:00.0", vendor_id="10de", device_id="2236", class_code="030000"
    )
    await bus.publish(
        INVENTORY_PUBLISHED.to(node="n2"),
        InventoryPublished(
            event_id=new_id(), node="n2", time=now,
            inventory=GpuInventory(node="n2", devices=(device,), time=now),
        ),
    )  # fmt: skip
    mapped = (GpuRequest(kind=GpuKind.PASSTHROUGH, mapping="gpu-a"),)
    command = PlaceGuest(
        command_id=new_id(),
        spec=PlacementSpec(
            vmid=101,
            guest_type=GuestType.QEMU,
            resources=ResourceRequest(vcpus=1, memory=GIB, gpus=mapped),
        ),
    )
    with pytest.raises(RucherError) as unknown:
        await bus.request(GUEST_PLACE.address, command)
    assert unknown.value.code is ErrorCode.INVALID
    assert "unknown PCI mapping gpu-a" in unknown.value.message

    mappings: KV[PciMapping] = KV(bus, MAPPINGS, PciMapping)
    entry = PciMappingEntry(node="n2", path="0000:81:00.0", vendor_id="10de", device_id="2236")
    await mappings.put(make_key("pci", "gpu-a"), PciMapping(id="gpu-a", map=(entry,)))

    async def placed_on_n2() -> bool:
        try:
            decision = await bus.request(
                GUEST_PLACE.address, msgspec.structs.replace(command, command_id=new_id())
            )
        except RucherError:
            return False
        assert decision.placement.node == "n2"
        return True

    await until(placed_on_n2, timeout=10)

    await mappings.delete(make_key("pci", "gpu-a"))

    async def forgotten() -> bool:
        try:
            await bus.request(
                GUEST_PLACE.address, msgspec.structs.replace(command, command_id=new_id())
            )
        except RucherError as err:
            return "unknown PCI mapping" in err.message
        return False

    await until(forgotten, timeout=10)
