"""HA failover benchmark: kill a node N times on the 3-node harness, time each guest's recovery.

Run (root): .venv/bin/python ops/bench/failover.py [--runs 20] [--guests 2] [--budget 900]

Builds the harness once (3 nodes, a libvirtd each, one Ceph on the bridge), starts storage,
compute and HA on every node and makes ``--guests`` small HA guests (TCG, direct kernel boot,
RBD disk) on n1. Each run kills every process of the node running the first guest, measures for
each guest that ran there the time from the kill until its QEMU process started on another node
(as the /proc checker sees it, independently of the bus), then restarts the killed node and
waits until it is whole again. The checker records through all runs and counts every time a
guest ran on two nodes at once. ``RUCHER_HA_*`` variables in the environment reach the HA
services (the defaults are the documented ones).

Targets: p50 <= 10 s, p99 <= 20 s, zero double-runs. Last line:
RESULT failover_p50_s=<x> failover_p99_s=<y> double_runs=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rucher.bus import Bus
from rucher.testing.ha_cluster import Failover, HaCluster
from rucher.testing.harness import Harness

ROOT = Path(__file__).resolve().parents[2]


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def guest_files() -> tuple[Path, Path]:
    """The test guest's kernel and initramfs (built once by ops/build-guest)."""
    result = subprocess.run(
        [str(ROOT / "ops" / "build-guest"), "--print-dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    folder = Path(result.stdout.strip().splitlines()[-1])
    return folder / "vmlinux", folder / "initramfs.cpio"


async def settle(cluster: HaCluster, bus: Bus, node: str) -> None:
    """After a restart: the cluster whole again, the node's agents and HA lease back."""
    harness = cluster.harness
    await asyncio.to_thread(harness.wait_cluster_whole, 60.0)
    await cluster.wait_agents(bus, [harness.node(node)])
    await cluster.wait_ha_lease(bus, node)
    await asyncio.sleep(2.0)  # let every stream replica on the node catch up


async def bench(cluster: HaCluster, runs: int, guests: int, budget: float) -> list[Failover]:
    """The runs; every failover measured."""
    started = time.monotonic()
    bus = await Bus.connect(cluster.harness.urls, node="bench", service="bench")
    moves: list[Failover] = []
    try:
        await cluster.wait_agents(bus)
        for node in cluster.harness.nodes:
            await cluster.wait_ha_lease(bus, node.name)
        base = 910_000 + secrets.randbelow(80_000)
        vmids = [base + index for index in range(guests)]
        cluster.start_checker()
        for vmid in vmids:
            await cluster.create_guest(bus, vmid, "n1")
        await cluster.make_ha(bus, vmids)
        placed = await cluster.wait_running(vmids, timeout=180)
        for run in range(1, runs + 1):
            if time.monotonic() - started > budget:
                print(f"budget of {budget:.0f} s spent after {run - 1} runs", flush=True)
                break
            victim = placed[vmids[0]]
            on_victim = [vmid for vmid, node in placed.items() if node == victim]
            measured = await cluster.kill_and_measure(victim, on_victim, timeout=90)
            moves += measured
            times = ", ".join(
                f"{m.vmid}->{m.target} {m.seconds:.2f} s" if m.seconds is not None else "lost"
                for m in measured
            )
            print(f"run {run}: killed {victim}: {times}", flush=True)
            if any(m.seconds is None for m in measured):
                print(cluster.logs(victim, "ha", 5), flush=True)
            await asyncio.to_thread(cluster.harness.restart, victim)
            await settle(cluster, bus, victim)
            placed = await cluster.wait_running(vmids, timeout=60)
    finally:
        await bus.close(grace=1.0)
    return moves


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the distribution."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--guests", type=int, default=2)
    parser.add_argument("--budget", type=float, default=840.0, help="seconds for all runs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("failover.py needs root (network namespaces)", file=sys.stderr)
        return 2
    kernel, initrd = guest_files()
    ha_env = {k: v for k, v in os.environ.items() if k.startswith("RUCHER_HA_")}
    with tempfile.TemporaryDirectory(prefix="rucher-failover-") as folder:
        harness = Harness(3, Path(folder), libvirt=True, ceph=True).start()
        cluster = HaCluster(harness, kernel, initrd, "console=ttyS0 quiet panic=-1", ha_env)
        try:
            cluster.start_services()
            moves = asyncio.run(bench(cluster, args.runs, args.guests, args.budget))
        finally:
            if cluster.checker is not None:
                cluster.checker.stop()
            harness.stop()
    times = [m.seconds for m in moves if m.seconds is not None]
    lost = len(moves) - len(times)
    doubles = cluster.double_runs() if cluster.checker is not None else []
    for line in doubles:
        print(f"DOUBLE RUN: {line}")
    if not times:
        print("no failover measured")
        print(f"RESULT failover_p50_s=nan failover_p99_s=nan double_runs={len(doubles)}")
        return 1
    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
    print(
        f"failovers={len(times)} lost={lost} p50={p50:.2f} s p99={p99:.2f} s "
        f"max={max(times):.2f} s min={min(times):.2f} s double_runs={len(doubles)}"
    )
    print(f"RESULT failover_p50_s={p50:.2f} failover_p99_s={p99:.2f} double_runs={len(doubles)}")
    return 0 if lost == 0 and not doubles else 1


if __name__ == "__main__":
    sys.exit(main())
