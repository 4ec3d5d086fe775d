"""Storage benchmark: a linked clone through the storage service vs the same clone done directly.

Run: .venv/bin/python ops/bench/storage.py [--clones N] [--rounds R]

It starts what it needs in a temporary folder (a nats-server, a single-node Ceph, the storage
service as its own process with that Ceph as storage ``ceph`` and a ``local`` dir storage) and
removes all of it afterwards. Each backend gets a template base made through the service; then
the two sides take turns clone by clone (N clones per side and round, the side going first
alternating), so that both see the same moments of a busy machine:

- rbd: ``rpc.storage.volume_clone`` (linked) over NATS vs ``rbd.RBD().clone`` of the same
  ``base@__base__`` called directly with the bindings in this process;
- dir: ``rpc.storage.volume_clone`` (linked, a qcow2 overlay) vs ``qemu-img create -b`` of the
  same overlay run directly.

Reported per side: median and p90 milliseconds per clone, and two ratios: service / direct
medians, and the median of the ratios of clones made back to back (each service clone against
the direct clone next to it in time). On a machine others load too, the second moves far less
between runs: a burst of load weighs on both clones of a pair instead of on one side's median.
The RESULT line carries the paired ratio; both are printed. Last line:
RESULT rbd_clone_ratio=<x> dir_clone_ratio=<y>
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rucher.bus import Bus, RucherError
from rucher.proto import storage as s
from rucher.proto.storage import DiskFormat
from rucher.testing.ceph import CephCluster, ceph_unavailable
from rucher.testing.nats import NatsServer

ROOT = Path(__file__).resolve().parents[2]
BASE_VMID = 900
BASE_SIZE = 512 << 20


def start_service(url: str, state: Path, conf: Path) -> subprocess.Popen[bytes]:
    """The storage service as a process of its own, with the bench's Ceph as storage ``ceph``."""
    state.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "RUCHER_NATS_URL": url,
        "RUCHER_NODE": "bench",
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_STORAGE_LOCAL_PATH": str(state / "local"),
        "RUCHER_CEPH_CONF": str(conf),
        "RUCHER_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "rucher.storage"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(state / "storage.log").open("wb"),
        start_new_session=True,
    )


async def request(bus: Bus, subject: Any, **fields: Any) -> Any:
    """One storage request to the bench node."""
    if "command_id" in subject.payload.__struct_fields__:
        fields["command_id"] = uuid.uuid4().hex
    return await bus.request(subject.to(node="bench"), subject.payload(**fields), timeout=60.0)


async def wait_ready(bus: Bus, service: subprocess.Popen[bytes]) -> None:
    """Until the service answers and sees both storages."""
    deadline = time.monotonic() + 60
    while True:
        if service.poll() is not None:
            raise RuntimeError(f"the storage service exited with {service.returncode}")
        try:
            report = await request(bus, s.STATUS, enabled_only=True)
            if {st.storage for st in report.storages if st.active} >= {"ceph", "local"}:
                return
        except RucherError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the storage service did not become ready")
        await asyncio.sleep(0.2)


async def make_base(bus: Bus, storage: str, fmt: DiskFormat | None) -> str:
    """A 512 MiB disk turned into a template base, through the service."""
    volume = (
        await request(
            bus, s.VOLUME_ALLOCATE, storage=storage, vmid=BASE_VMID, size=BASE_SIZE, format=fmt
        )
    ).volume
    return str((await request(bus, s.VOLUME_CREATE_BASE, volid=volume.volid)).volume.volid)


async def timed(action: Callable[[int], Awaitable[None]], first: int, count: int) -> list[float]:
    """Milliseconds per call of ``action(vmid)`` for ``count`` fresh VMIDs."""
    return [await once(action, vmid) for vmid in range(first, first + count)]


async def once(action: Callable[[int], Awaitable[None]], vmid: int) -> float:
    """Milliseconds of one call of ``action(vmid)``."""
    started = time.perf_counter()
    await action(vmid)
    return (time.perf_counter() - started) * 1000


async def in_turns(
    sides: dict[str, Callable[[int], Awaitable[None]]],
    results: dict[str, list[float]],
    first: int,
    count: int,
) -> None:
    """``count`` calls of each side, taking turns call by call; who goes first alternates."""
    names = list(sides)
    for index in range(count):
        order = names if index % 2 == 0 else names[::-1]
        for offset, name in enumerate(order):
            vmid = first + index * len(names) + offset
            results[name].append(await once(sides[name], vmid))


def summary(name: str, samples: list[float]) -> float:
    """Print median and p90; return the median."""
    ordered = sorted(samples)
    median = statistics.median(ordered)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    print(f"  {name:<34} median {median:7.2f} ms   p90 {p90:7.2f} ms   ({len(ordered)} clones)")
    return median


def ratios(service: list[float], direct: list[float], service_name: str, direct_name: str) -> float:
    """Print both sides and both ratios; return the median of the back-to-back pairs' ratios."""
    of_medians = summary(service_name, service) / summary(direct_name, direct)
    paired = statistics.median(s / d for s, d in zip(service, direct, strict=True))
    print(
        f"  ratio of the medians {of_medians:.2f}   median ratio of back-to-back pairs {paired:.2f}"
    )
    return paired


async def bench(cluster: CephCluster, url: str, state: Path, clones: int, rounds: int) -> None:
    """Both backends, rounds alternating between the service and the direct call."""
    rados, rbd = importlib.import_module("rados"), importlib.import_module("rbd")
    bus = await Bus.connect(url, node="bench-client", service="bench")
    client = rados.Rados(rados_id="admin", conffile=None, conf=cluster.client_settings())
    client.connect(timeout=10)
    ioctx = client.open_ioctx(cluster.pool)
    qemu_img = shutil.which("qemu-img") or "qemu-img"
    images = state / "local" / "images"
    try:
        rbd_base = await make_base(bus, "ceph", None)
        dir_base = await make_base(bus, "local", DiskFormat.QCOW2)
        base_image = rbd_base.split(":", 1)[1]
        base_file = dir_base.split(":", 1)[1].split("/", 1)[1]

        async def service_clone(base: str, vmid: int) -> None:
            await request(bus, s.VOLUME_CLONE, volid=base, vmid=vmid, linked=True,
                          filename=f"vm-{vmid}-disk-0")  # fmt: skip

        # The baselines block on purpose: the call exactly as a script would make it, no loop.
        async def direct_rbd(vmid: int) -> None:
            rbd.RBD().clone(ioctx, base_image, "__base__", ioctx, f"vm-{vmid}-disk-0",
                            features=rbd.RBD_FEATURE_LAYERING)  # fmt: skip

        async def direct_dir(vmid: int) -> None:
            folder = images / str(vmid)
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(  # noqa: ASYNC221
                [qemu_img, "create", "-q", "-f", "qcow2", "-b", f"../{BASE_VMID}/{base_file}",
                 "-F", "qcow2", str(folder / f"vm-{vmid}-disk-0.qcow2")],
                check=True,
            )  # fmt: skip

        results: dict[str, list[float]] = {k: [] for k in ("rs", "rd", "ds", "dd")}
        await timed(lambda v: service_clone(rbd_base, v), 90_000, 5)  # warm both paths up
        await timed(lambda v: service_clone(dir_base, v), 91_000, 5)
        rbd_sides = {"rs": lambda v: service_clone(rbd_base, v), "rd": direct_rbd}
        dir_sides = {"ds": lambda v: service_clone(dir_base, v), "dd": direct_dir}
        for number in range(rounds):
            first = 10_000 + number * 4 * clones
            await in_turns(rbd_sides, results, first, clones)
            await in_turns(dir_sides, results, first + 2 * clones, clones)
        print("rbd linked clone (base@__base__ -> vm-N-disk-0):")
        rbd_ratio = ratios(
            results["rs"], results["rd"], "storage service over NATS", "rbd.RBD().clone directly"
        )
        print("dir linked clone (qcow2 overlay on a base):")
        dir_ratio = ratios(
            results["ds"], results["dd"], "storage service over NATS", "qemu-img create -b directly"
        )
        print(f"RESULT rbd_clone_ratio={rbd_ratio:.2f} dir_clone_ratio={dir_ratio:.2f}")
    finally:
        ioctx.close()
        client.shutdown()
        await bus.close(grace=1.0)


def main() -> int:
    """Start everything, measure, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clones", type=int, default=25, help="clones per side and round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    args = parser.parse_args()
    reason = ceph_unavailable()
    if reason is not None:
        print(f"storage bench: Ceph unavailable: {reason}", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="rucher-bench-storage-"))
    nats = NatsServer(name="bench-nats", store_dir=root / "nats")
    cluster = CephCluster(root / "ceph")
    service: subprocess.Popen[bytes] | None = None
    try:
        nats.start()
        nats.wait_ready()
        started = time.monotonic()
        cluster.start()
        print(f"ceph up in {time.monotonic() - started:.1f} s; qemu-img {shutil.which('qemu-img')}")
        service = start_service(nats.url, root / "state", cluster.conf)

        async def run() -> None:
            probe = await Bus.connect(nats.url, node="bench-probe", service="bench")
            try:
                await wait_ready(probe, service)
            finally:
                await probe.close(grace=0.5)
            await bench(cluster, nats.url, root / "state", args.clones, args.rounds)

        asyncio.run(run())
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGTERM)
            service.wait(15)
        cluster.stop()
        nats.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
