"""Scheduler benchmark: decisions per second at 1k/10k/100k nodes, claims through NATS, contention.

Run: .venv/bin/python ops/bench/scheduler.py [--sizes 1000,10000,100000] [--requests N]
     [--claims N] [--contention N] [--seed S]

1. Decisions, in memory. For each size, a synthetic cluster: nodes of 32-128 CPUs and 256 GiB to
   1 TiB; 20% of them with GPUs, half of those MIG-capable H200s (the real profile and placement
   tables of shared/fixtures/gpu/h200) carrying random existing MIG layouts, the other half
   whole GPUs and an mdev (vGPU) type; a few storages and CPU flag sets. The cluster is filled to
   70% before timing. Requests: 70% small (1-4 vCPUs, 1-8 GiB), 25% large (8-32 vCPUs, 16-128
   GiB), 5% with a whole GPU, an mdev type or a MIG profile; 10% under affinity rules (node
   affinity, or with or apart from running guests). Each decision is timed alone (compile,
   filters, weighers, choice); each placed guest is then reserved in the view, as the service
   does with its claims. Beside it, the naive baseline on the same cluster and stream: every
   node checked by every filter, one node at a time, then the best one chosen.
2. Claims, through a real 3-node NATS cluster (JetStream, R3): claims committed with the
   scheduler's own claim store (compare-and-set on each node's allocations document, a claim
   record with a per-key TTL), pipelined by concurrent committers.
3. Contention: 4 scheduler processes (``python -m rucher.scheduler``, each with its own view)
   against the same 3-node cluster, with concurrent placement requests until the cluster is
   full; then every node's allocations are compared with its capacity: over-commits counted.

Last line: RESULT placements_per_s_10k=<x> p99_ms_10k=<y> overcommits=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nats.aio.msg import Msg

from rucher.bus import Bus
from rucher.placement import ClusterView, PlacementError, Reservation, place
from rucher.placement.mig import Geometry
from rucher.proto.cluster import CpuArch, NodeCapacity
from rucher.proto.gpu import (
    GpuInventory,
    GpuKind,
    MdevType,
    MigInstance,
    MigPlacement,
    MigProfile,
    PciDevice,
)
from rucher.proto.guest import GuestType
from rucher.proto.scheduler import (
    AffinityKind,
    GpuRequest,
    NodeAffinity,
    NodePriority,
    PlacementSpec,
    ResourceAffinity,
    ResourceRequest,
)
from rucher.proto.storage import StorageStatus, StorageType
from rucher.service.logging import configure_logging
from rucher.service.settings import LogFormat
from rucher.testing.nats import NatsCluster

GIB = 1 << 30
FILL = 0.70
NVIDIA, H200, L40S = "10de", "2335", "26b9"
VGPU_TYPE = "nvidia-1155"
STORAGES = ("local", "ceph", "nfs-a", "nfs-b")
FLAG_SETS = (("sse4_2", "avx2"), ("sse4_2", "avx2", "avx512f"), ("sse4_2", "avx2", "amx"))

# shared/fixtures/gpu/h200: nvidia-smi mig -lgip / -lgipp (id, name, instances, placements).
H200_TABLE = (
    (19, "1g.18gb", 7, (0, 1, 2, 3, 4, 5, 6), 1),
    (20, "1g.18gb+me", 1, (0, 1, 2, 3, 4, 5, 6), 1),
    (15, "1g.35gb", 4, (0, 2, 4, 6), 2),
    (14, "2g.35gb", 3, (0, 2, 4), 2),
    (9, "3g.71gb", 2, (0, 4), 4),
    (5, "4g.71gb", 1, (0,), 4),
    (0, "7g.141gb", 1, (0,), 8),
)
H200_PROFILES = tuple(
    MigProfile(
        profile_id=pid,
        name=name,
        slices=min(size, 7),
        max_instances=count,
        memory=size * 18 * GIB,
        placements=tuple(MigPlacement(start=start, size=size) for start in starts),
    )
    for pid, name, count, starts, size in H200_TABLE
)
MIG_NAMES = tuple(row[1] for row in H200_TABLE)


# Synthetic clusters ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """A view filled to 70%, and what the request stream needs to know about it."""

    view: ClusterView
    names: list[str]
    vmids: list[int] = field(default_factory=list)


def _mig_layout(rng: random.Random, geometry: Geometry) -> tuple[MigInstance, ...]:
    """A random existing MIG layout: profiles placed where the broker would, about half full."""
    state = 0
    instances: list[MigInstance] = []
    for _ in range(rng.randint(0, 4)):
        name = rng.choice(MIG_NAMES[:5])
        best = geometry.best_placement(state, name)
        if best is None:
            continue
        placement, state = best
        profile = next(p for p in H200_PROFILES if p.name == name)
        instances.append(
            MigInstance(
                gpu_instance_id=len(instances), profile_id=profile.profile_id, placement=placement
            )
        )
    return tuple(instances)


def _inventory(rng: random.Random, node: str, mig: bool, geometry: Geometry) -> GpuInventory:
    devices = []
    for slot in range(rng.choice((2, 4, 8))):
        address = f"0000:{0x41 + slot:02x}:00.0"
        if mig:
            devices.append(
                PciDevice(
                    address=address,
                    vendor_id=NVIDIA,
                    device_id=H200,
                    class_code="030200",
                    mig_enabled=True,
                    mig_profiles=H200_PROFILES,
                    mig_instances=_mig_layout(rng, geometry),
                )
            )
        else:
            devices.append(
                PciDevice(
                    address=address,
                    vendor_id=NVIDIA,
                    device_id=L40S,
                    class_code="030200",
                    lease_id="in-use" if rng.random() < FILL else None,
                    mdev_types=(
                        MdevType(type_id=VGPU_TYPE, available_instances=rng.randint(0, 4)),
                    ),
                )
            )
    return GpuInventory(node=node, devices=tuple(devices), time=0.0)


def build_cluster(size: int, seed: int) -> Cluster:
    """A synthetic cluster of ``size`` nodes, filled to about 70% of memory and vCPUs."""
    rng = random.Random(seed)
    view = ClusterView(cpu_overcommit=2.0)
    geometry = Geometry.from_profiles(H200_PROFILES)
    cluster = Cluster(view=view, names=[f"node{i:06d}" for i in range(size)])
    storage = {
        name: StorageStatus(
            storage=name,
            storage_type=StorageType.DIR,
            content=(),
            shared=True,
            active=True,
            enabled=True,
        )
        for name in STORAGES
    }
    for index, node in enumerate(cluster.names):
        cpus = rng.choice((32, 64, 128))
        memory = rng.choice((256, 512, 1024)) * GIB
        view.set_capacity(
            NodeCapacity(
                node=node,
                arch=CpuArch.X86_64,
                cpu_model="synthetic",
                cpus=cpus,
                sockets=2,
                memory_total=memory,
                memory_used=0,
                time=0.0,
                cpu_flags=rng.choice(FLAG_SETS),
                cpu_usage=rng.random() * 0.8,
            )
        )
        view.set_online(node, True)
        view.set_storages(node, [storage["local"], *rng.sample(list(storage.values())[1:], 2)])
        if rng.random() < 0.2:
            view.set_gpu_inventory(_inventory(rng, node, rng.random() < 0.5, geometry))
        fill = rng.uniform(FILL - 0.1, FILL + 0.1)
        vmid = 1_000_000 + index  # one running guest per node stands for what fills it
        cluster.vmids.append(vmid)
        view.reserve(
            node,
            Reservation(
                key=f"fill-{index}",
                vmid=vmid,
                resources=ResourceRequest(
                    vcpus=max(1, int(cpus * 2 * fill)), memory=int(memory * fill)
                ),
            ),
        )
    return cluster


def request_stream(cluster: Cluster, count: int, seed: int) -> list[PlacementSpec]:
    """The request mix: small, large, GPU; a tenth of them under affinity rules."""
    rng = random.Random(seed)
    specs = []
    for n in range(count):
        kind = rng.random()
        gpus: tuple[GpuRequest, ...] = ()
        if kind < 0.70:
            vcpus, memory = rng.randint(1, 4), rng.randint(1, 8) * GIB
        elif kind < 0.95:
            vcpus, memory = rng.randint(8, 32), rng.randint(16, 128) * GIB
        else:
            vcpus, memory = rng.randint(2, 16), rng.randint(8, 64) * GIB
            gpus = (
                rng.choice(
                    (
                        GpuRequest(kind=GpuKind.PASSTHROUGH, vendor_id=NVIDIA, device_id=L40S),
                        GpuRequest(kind=GpuKind.MDEV, mdev_type=VGPU_TYPE),
                        GpuRequest(kind=GpuKind.MIG, mig_profile=rng.choice(MIG_NAMES)),
                    )
                ),
            )
        node_affinity = None
        resource_affinity: tuple[ResourceAffinity, ...] = ()
        if rng.random() < 0.10:
            if rng.random() < 0.5:
                nodes = rng.sample(cluster.names, 4)
                node_affinity = NodeAffinity(
                    nodes=tuple(
                        NodePriority(node=node, priority=rng.randint(0, 3)) for node in nodes
                    ),
                    strict=rng.random() < 0.3,
                )
            else:
                kind_of = rng.choice((AffinityKind.POSITIVE, AffinityKind.NEGATIVE))
                count_of = 1 if kind_of is AffinityKind.POSITIVE else 3
                resource_affinity = (
                    ResourceAffinity(
                        affinity=kind_of, vmids=tuple(rng.sample(cluster.vmids, count_of))
                    ),
                )
        specs.append(
            PlacementSpec(
                vmid=100 + n,
                guest_type=GuestType.QEMU,
                resources=ResourceRequest(
                    vcpus=vcpus,
                    memory=memory,
                    storages=(rng.choice(STORAGES),) if rng.random() < 0.5 else (),
                    cpu_flags=("avx512f",) if rng.random() < 0.1 else (),
                    gpus=gpus,
                ),
                node_affinity=node_affinity,
                resource_affinity=resource_affinity,
            )
        )
    return specs


# Decisions in memory ---------------------------------------------------------------------------

LIVE_GUESTS = 1000  # timed placements kept at once: the cluster stays about 70% full


@dataclass
class Timing:
    """Decision latencies of one run."""

    latencies: list[float]
    refused: int
    wall: float

    @property
    def per_second(self) -> float:
        return len(self.latencies) / sum(self.latencies)

    def percentile(self, share: float) -> float:
        return float(np.percentile(np.array(self.latencies), share)) * 1000.0


def run_fast(cluster: Cluster, specs: list[PlacementSpec]) -> Timing:
    """Time each decision; reserve what was placed, releasing the oldest beyond LIVE_GUESTS."""
    view = cluster.view
    latencies: list[float] = []
    refused = 0
    live: list[tuple[int, str]] = []
    started = time.perf_counter()
    for spec in specs:
        begin = time.perf_counter()
        try:
            decision = place(view, spec)
        except PlacementError:
            latencies.append(time.perf_counter() - begin)
            refused += 1
            continue
        latencies.append(time.perf_counter() - begin)
        key = f"bench-{spec.vmid}"
        view.reserve(decision.row, Reservation(key=key, vmid=spec.vmid, resources=spec.resources))
        live.append((decision.row, key))
        if len(live) > LIVE_GUESTS:
            row, old = live.pop(0)
            view.release(row, old)
    for row, key in live:
        view.release(row, key)
    return Timing(latencies, refused, time.perf_counter() - started)


@dataclass
class NaiveNode:
    """What a node-by-node scheduler keeps per host (Nova's HostState, in spirit)."""

    name: str
    schedulable: bool
    vcpu_free: float
    vcpu_total: float
    mem_free: int
    mem_total: int
    load: float
    arch: str
    flags: frozenset[str]
    storages: frozenset[str]
    devices: dict[tuple[str, str, str], int]
    mdevs: dict[str, int]
    mig: list[int]
    has_gpu: bool


def naive_nodes(view: ClusterView) -> list[NaiveNode]:
    """Per-node records built from the same cluster the fast path uses."""
    nodes = []
    flag_names = view.flags.names
    storage_names = view.storage_ids.names
    gpu = view.gpu
    for i, name in enumerate(view.names):
        flags = int.from_bytes(view.cpu_flags[i].tobytes(), "little")
        storage = int.from_bytes(view.storage[i].tobytes(), "little")
        nodes.append(
            NaiveNode(
                name=name,
                schedulable=bool(view.schedulable[i]),
                vcpu_free=float(view.vcpu_free[i]),
                vcpu_total=float(view.vcpu_total[i]),
                mem_free=int(view.mem_free[i]),
                mem_total=int(view.mem_total[i]),
                load=float(view.cpu_load[i]),
                arch=view.archs.names[int(view.arch[i])],
                flags=frozenset(f for b, f in enumerate(flag_names) if flags >> b & 1),
                storages=frozenset(s for b, s in enumerate(storage_names) if storage >> b & 1),
                devices={k: int(gpu.dev_free[i, c]) for k, c in gpu.devices.index.items()},
                mdevs={k: int(gpu.mdev_free[i, c]) for k, c in gpu.mdev_types.index.items()},
                mig=[int(code) for code in gpu.mig[i] if code],
                has_gpu=bool(gpu.has_gpu[i]),
            )
        )
    return nodes


def _naive_gpus(
    node: NaiveNode, resources: ResourceRequest, view: ClusterView
) -> tuple[bool, float, int | None]:
    """Whether the node's devices fit the request, the MIG potential lost, and the MIG GPU."""
    catalog = view.mig
    lost, mig_gpu = 0.0, None
    for request in resources.gpus:
        if request.kind is GpuKind.MIG and request.mig_profile is not None:
            row = catalog.profiles[request.mig_profile]
            losses = [(float(catalog.tables.loss[row, c]), g) for g, c in enumerate(node.mig)]
            finite = [pair for pair in losses if math.isfinite(pair[0])]
            if not finite:
                return False, 0.0, None
            lost, mig_gpu = min(finite)
        elif request.kind is GpuKind.MDEV and request.mdev_type is not None:
            if node.mdevs.get(request.mdev_type, 0) < request.count:
                return False, 0.0, None
        else:
            key = (request.kind.value, request.vendor_id or "*", request.device_id or "*")
            if node.devices.get(key, 0) < request.count:
                return False, 0.0, None
    return True, lost, mig_gpu


def _naive_fits(node: NaiveNode, resources: ResourceRequest) -> bool:
    return (
        node.vcpu_free >= resources.vcpus
        and node.mem_free >= resources.memory
        and node.arch == resources.arch.value
        and set(resources.cpu_flags) <= node.flags
        and set(resources.storages) <= node.storages
    )


def naive_place(
    nodes: list[NaiveNode], spec: PlacementSpec, view: ClusterView
) -> tuple[int, int | None] | None:
    """Every filter on every node, one node at a time, then the best by the same weighers."""
    resources = spec.resources
    members = {
        kind: {
            view.locations[v]
            for r in spec.resource_affinity
            if r.affinity is kind
            for v in r.vmids
            if v in view.locations
        }
        for kind in AffinityKind
    }
    together, apart = members[AffinityKind.POSITIVE], members[AffinityKind.NEGATIVE]
    rule = spec.node_affinity
    priority = {p.node: p.priority for p in rule.nodes} if rule else {}
    best: tuple[float, float, str] | None = None
    chosen: tuple[int, int | None] | None = None
    for i, node in enumerate(nodes):
        if not node.schedulable or i in apart or (together and i not in together):
            continue
        if rule is not None and rule.strict and node.name not in priority:
            continue
        if not _naive_fits(node, resources):
            continue
        fits, lost, mig_gpu = _naive_gpus(node, resources, view)
        if not fits:
            continue
        room = (
            (node.mem_free - resources.memory) / node.mem_total
            + (node.vcpu_free - resources.vcpus) / node.vcpu_total
        ) / 2
        # The engine's weighers, in its order: spread, fragmentation, load.
        if not resources.gpus:
            score = room + (0.0 if node.has_gpu else 1.0)
        else:
            score = room - lost / 1000.0
        score += 0.25 * (1.0 - node.load)
        key = (float(priority.get(node.name, -1 if rule else 0)), score, node.name)
        if best is None or key[:2] > best[:2] or (key[:2] == best[:2] and key[2] < best[2]):
            best, chosen = key, (i, mig_gpu)
    return chosen


def naive_reserve(
    nodes: list[NaiveNode], chosen: tuple[int, int | None], spec: PlacementSpec, view: ClusterView
) -> None:
    """Take what the guest holds from the naive per-node records."""
    index, mig_gpu = chosen
    node = nodes[index]
    node.vcpu_free -= spec.resources.vcpus
    node.mem_free -= spec.resources.memory
    for request in spec.resources.gpus:
        if request.kind is GpuKind.MIG and request.mig_profile is not None and mig_gpu is not None:
            row = view.mig.profiles[request.mig_profile]
            node.mig[mig_gpu] = int(view.mig.tables.next[row, node.mig[mig_gpu]])
        elif request.kind is GpuKind.MDEV and request.mdev_type is not None:
            node.mdevs[request.mdev_type] -= request.count
        else:
            key = (request.kind.value, request.vendor_id or "*", request.device_id or "*")
            node.devices[key] = node.devices.get(key, 0) - request.count


def run_naive(cluster: Cluster, specs: list[PlacementSpec]) -> Timing:
    """The baseline over the same stream (fewer requests: it is slow)."""
    nodes = naive_nodes(cluster.view)
    latencies: list[float] = []
    refused = 0
    started = time.perf_counter()
    for spec in specs:
        begin = time.perf_counter()
        chosen = naive_place(nodes, spec, cluster.view)
        latencies.append(time.perf_counter() - begin)
        if chosen is None:
            refused += 1
        else:
            naive_reserve(nodes, chosen, spec, cluster.view)
    return Timing(latencies, refused, time.perf_counter() - started)


# Claims through a real NATS cluster --------------------------------------------------------------


async def claims_throughput(
    urls: list[str], size: int, count: int, concurrency: int, seed: int
) -> tuple[float, int, int]:
    """Claims/s committed by the scheduler's own service code against the cluster store."""
    from rucher.bus import Bus, RucherError
    from rucher.bus.provision import provision
    from rucher.claims import BusEvents, KvClaimStore
    from rucher.scheduler.config import SchedulerSettings
    from rucher.scheduler.service import SchedulerService
    from rucher.service import Settings

    cluster = build_cluster(size, seed)
    bus = await Bus.connect(urls, node="bench", service="bench")
    try:
        await provision(bus, replicas=len(urls))
        settings = SchedulerSettings.from_env(Settings.from_env("scheduler", {}), {})
        events = BusEvents(bus)
        service = SchedulerService(
            cluster.view,
            KvClaimStore(bus),
            events,
            settings,
            scheduler="bench",
            clock=time.time,
        )
        # What fills the cluster are guests running there, as the feed would report them.
        for node in cluster.names:
            for held in cluster.view.reservations(node):
                service.ledger.set_guest(node, held, held.vmid)
        from rucher.proto.scheduler import PlaceGuest

        commands = [
            PlaceGuest(command_id=f"bench-{spec.vmid}", spec=spec, claim_ttl=600.0)
            for spec in request_stream(cluster, count, seed + 1)
        ]
        gate = asyncio.Semaphore(concurrency)
        placed = refused = 0

        async def claim(command: PlaceGuest) -> None:
            nonlocal placed, refused
            async with gate:
                try:
                    await service.place_guest(command)
                    placed += 1
                except RucherError:
                    refused += 1

        started = time.perf_counter()
        await asyncio.gather(*(claim(command) for command in commands))
        elapsed = time.perf_counter() - started
        await events.drain()
        return placed / elapsed, placed, refused
    finally:
        await bus.close(grace=2.0)


# Contention: scheduler processes racing ----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
CONTENTION_NODE_MEMORY = 16 * GIB
CONTENTION_GUEST_MEMORY = 3 * GIB


def start_scheduler(url: str, state: Path, node: str) -> subprocess.Popen[bytes]:
    """One ``python -m rucher.scheduler`` process connected to ``url``."""
    state.mkdir(parents=True, exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUCHER_")}
    environ.update(
        RUCHER_NATS_URL=url,
        RUCHER_NODE=node,
        RUCHER_STATE_DIR=str(state),
        RUCHER_LOG_FORMAT="json",
        RUCHER_LOG_LEVEL="warning",
        RUCHER_JS_REPLICAS="3",
        RUCHER_REGISTRY_TTL="5",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "rucher.scheduler"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=(state / "scheduler.log").open("wb"),
        start_new_session=True,
    )


async def seed_nodes(bus: Bus, nodes: list[str]) -> None:
    """Announce nodes as their agents do: a registered compute agent and published capacity."""
    from rucher.bus import KV
    from rucher.bus.client import new_id
    from rucher.bus.codec import encode
    from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished
    from rucher.proto.keys import make_key
    from rucher.proto.node import LeaseRecord, ServiceInstance
    from rucher.proto.streams import SERVICES

    registry: KV[LeaseRecord] = KV(bus, SERVICES, LeaseRecord)
    for node in nodes:
        agent = ServiceInstance(
            service="compute", node=node, instance="bench", version="0", address="", pid=0,
            started=time.time(),
        )  # fmt: skip
        await registry.put(
            make_key("compute", node, "bench"),
            LeaseRecord(
                holder="bench", token=1, ttl=3600.0, renewed=time.time(), info=encode(agent)
            ),
        )
        capacity = NodeCapacity(
            node=node, arch=CpuArch.X86_64, cpu_model="bench", cpus=8, sockets=1,
            memory_total=CONTENTION_NODE_MEMORY, memory_used=0, time=time.time(),
        )  # fmt: skip
        await bus.publish(
            NODE_CAPACITY_PUBLISHED.to(node=node),
            CapacityPublished(event_id=new_id(), node=node, time=time.time(), capacity=capacity),
        )


async def serving(bus: Bus, count: int, timeout: float = 60.0) -> None:
    """Wait until ``count`` scheduler processes answer a ping (their views are loaded)."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers: set[str] = set()
        inbox = bus.nc.new_inbox()

        async def collect(msg: Msg, answers: set[str] = answers) -> None:
            if msg.data:  # "no responders" comes back as an empty status message
                answers.add(json.loads(msg.data)["id"])

        subscription = await bus.nc.subscribe(inbox, cb=collect)
        await bus.nc.publish("$SRV.PING.scheduler", b"", reply=inbox)
        await asyncio.sleep(0.5)
        await subscription.unsubscribe()
        if len(answers) >= count:
            return
    raise TimeoutError(f"fewer than {count} schedulers answer")


@dataclass
class Contention:
    """What the racing schedulers did."""

    placed: int
    fits: int
    overcommits: int
    schedulers: int
    elapsed: float


async def contention(urls: list[str], root: Path, processes: int, nodes: int) -> Contention:
    """``processes`` schedulers, each with its own view, racing to fill ``nodes`` nodes."""
    from rucher.bus import KV, RucherError
    from rucher.bus.provision import provision
    from rucher.proto.keys import encode_token
    from rucher.proto.scheduler import GUEST_PLACE, NodeAllocations, PlaceGuest
    from rucher.proto.streams import ALLOCATIONS

    names = [f"race{i:04d}" for i in range(nodes)]
    per_node = CONTENTION_NODE_MEMORY // CONTENTION_GUEST_MEMORY
    fits = nodes * per_node
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for n, url in enumerate(urls):
            client = await Bus.connect(url, node=f"client{n}", service="bench")
            stack.push_async_callback(client.close, grace=2.0)
            clients.append(client)
        await provision(clients[0], replicas=len(urls))
        await seed_nodes(clients[0], names)
        schedulers = [
            start_scheduler(urls[n % len(urls)], root / f"scheduler-{n}", f"sched{n}")
            for n in range(processes)
        ]
        try:
            await serving(clients[0], processes)

            async def attempt(vmid: int) -> bool:
                command = PlaceGuest(
                    command_id=f"race-{vmid}",
                    spec=PlacementSpec(
                        vmid=vmid,
                        guest_type=GuestType.QEMU,
                        resources=ResourceRequest(vcpus=1, memory=CONTENTION_GUEST_MEMORY),
                    ),
                    claim_ttl=600.0,
                )
                try:
                    await clients[vmid % len(clients)].request(
                        GUEST_PLACE.address, command, timeout=60.0
                    )
                except RucherError:
                    return False
                return True

            started = time.perf_counter()
            outcomes = await asyncio.gather(*(attempt(100 + n) for n in range(2 * fits)))
            placed = sum(outcomes)
            vmid = 100 + 2 * fits
            while await attempt(vmid):  # what lost too many races, one by one
                placed += 1
                vmid += 1
            elapsed = time.perf_counter() - started
            kv: KV[NodeAllocations] = KV(clients[0], ALLOCATIONS, NodeAllocations)
            overcommits = 0
            claimed_by: set[str] = set()
            for node in names:
                entry = await kv.get(encode_token(node))
                claims = entry.value.claims if entry and entry.value else ()
                memory = sum(claim.resources.memory for claim in claims)
                vcpus = sum(claim.resources.vcpus for claim in claims)
                overcommits += memory > CONTENTION_NODE_MEMORY or vcpus > 8 * 2
                claimed_by |= {claim.scheduler for claim in claims}
            return Contention(placed, fits, overcommits, len(claimed_by), elapsed)
        finally:
            for process in schedulers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            for process in schedulers:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


# Report ------------------------------------------------------------------------------------------

NAIVE_REQUESTS = {1_000: 400, 10_000: 50, 100_000: 8}


def decisions(sizes: list[int], requests: int, seed: int) -> dict[int, tuple[Timing, Timing]]:
    """Both schedulers at every size, on the same clusters and request streams."""
    results = {}
    for size in sizes:
        began = time.perf_counter()
        cluster = build_cluster(size, seed)
        built = time.perf_counter() - began
        specs = request_stream(cluster, requests, seed + 1)
        gc.collect()
        gc.freeze()  # the view's long-lived objects: as a service does once loaded
        fast = run_fast(cluster, specs)
        cluster = build_cluster(size, seed)
        naive = run_naive(cluster, specs[: NAIVE_REQUESTS.get(size, max(4, 400_000 // size))])
        gc.unfreeze()
        print(
            f"  {size:>7} nodes  built in {built:5.1f} s  "
            f"rucher {fast.per_second:8.0f}/s p50 {fast.percentile(50):6.3f} ms "
            f"p99 {fast.percentile(99):6.3f} ms "
            f"refused {fast.refused:>4}/{len(fast.latencies)}  |  "
            f"naive {naive.per_second:8.1f}/s p50 {naive.percentile(50):8.2f} ms "
            f"p99 {naive.percentile(99):8.2f} ms ({len(naive.latencies)} requests)",
            flush=True,
        )
        results[size] = (fast, naive)
    return results


async def through_nats(args: argparse.Namespace) -> tuple[float, Contention | None]:
    """Claims/s and the contention run, on a fresh 3-node NATS cluster."""
    with tempfile.TemporaryDirectory(prefix="rucher-bench-scheduler-") as folder:
        root = Path(folder)
        cluster = NatsCluster.create(root / "nats", size=3)
        cluster.start()
        try:
            rate, placed, refused = await claims_throughput(
                cluster.urls, args.claims_nodes, args.claims, args.concurrency, args.seed
            )
            print(
                f"  claims through a 3-node NATS cluster (R3): {rate:7.0f}/s "
                f"({placed} committed, {refused} refused, {args.concurrency} in flight, "
                f"{args.claims_nodes} nodes)",
                flush=True,
            )
            result = None
            if args.schedulers:
                result = await contention(
                    cluster.urls, root, args.schedulers, args.contention_nodes
                )
                print(
                    f"  contention: {args.schedulers} scheduler processes, "
                    f"{args.contention_nodes} nodes: {result.placed} placed of {result.fits} "
                    f"that fit, claims from {result.schedulers} processes, "
                    f"{result.placed / result.elapsed:.0f} placements/s, "
                    f"over-commits {result.overcommits}",
                    flush=True,
                )
            return rate, result
        finally:
            cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--claims", type=int, default=3_000)
    parser.add_argument("--claims-nodes", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--schedulers", type=int, default=4)
    parser.add_argument("--contention-nodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    configure_logging(LogFormat.CONSOLE, "warning", service="bench")
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"Decisions in memory ({args.requests} requests per size, cluster 70% full):")
    results = decisions(sizes, args.requests, args.seed)
    if len(sizes) > 1:
        (fast_first, naive_first), (fast_last, naive_last) = results[sizes[0]], results[sizes[-1]]
        print(
            f"  cost per decision grew {fast_first.per_second / fast_last.per_second:.2f}x "
            f"for {sizes[-1] / sizes[0]:.0f}x the nodes "
            f"(naive: {naive_first.per_second / naive_last.per_second:.0f}x)"
        )
    print("Through the cluster store:")
    _, race = asyncio.run(through_nats(args))
    reference = results.get(10_000, results[sizes[-1]])[0]
    print(
        f"RESULT placements_per_s_10k={reference.per_second:.0f} "
        f"p99_ms_10k={reference.percentile(99):.3f} "
        f"overcommits={race.overcommits if race else 0}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
