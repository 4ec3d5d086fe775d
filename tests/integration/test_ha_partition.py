"""A partition in the multi-node harness: the cut-off node's watchdog kills its HA guest before
the node's lease expires for the others, so the guest can be started elsewhere without ever
running twice (as the bus-independent QEMU checker sees it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys

import pytest

from rucher.bus import RucherError
from rucher.haconfig import HaConfigStore
from rucher.leases import current, node_lease_key
from rucher.proto.ha import HaResource, HaResources
from rucher.proto.streams import node_lease_bucket
from rucher.testing.harness_node import Node
from rucher.testing.qemu_checker import QemuChecker, boottime

from .buses import connected, until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMING = {
    "RUCHER_HA_LEASE_TTL": "6",
    "RUCHER_HA_RENEW_INTERVAL": "0.5",
    "RUCHER_HA_KILL_MARGIN": "2",
    "RUCHER_HA_TICK": "0.05",
    "RUCHER_HA_DESTROY_TIMEOUT": "0.5",
    "RUCHER_HA_HW_TIMEOUT": "1",
    "RUCHER_HA_LIBVIRT_URI": "test:///default",
    "RUCHER_REGISTRY_TTL": "10",
}


def start_guest(node: Node, vmid: int) -> None:
    """A stand-in QEMU process for ``rucher-VMID`` inside the node's namespace."""
    node.start_process(
        f"guest-{vmid}",
        ["bash", "-c", f'exec -a qemu-system-x86_64 {sys.executable} -c "import time; '
         f'time.sleep(600)" -name guest=rucher-{vmid},debug-threads=on'],
    )  # fmt: skip


def guest_set(node: Node) -> list[int]:
    path = node.state_dir / "data" / "ha" / "ha-guests.json"
    return json.loads(path.read_text()) if path.exists() else []


async def test_a_cut_off_node_kills_its_ha_guest_before_its_lease_expires(harness_factory):
    harness = harness_factory(3)
    a, b = harness.node("n1"), harness.node("n2")
    vmid = 800_000 + secrets.randbelow(99_999)
    guest = f"rucher-{vmid}"
    for node in (a, b):
        node.start_service("ha", [sys.executable, "-m", "rucher.ha.nodewatch"], TIMING)
    async with connected([b.url, harness.node("n3").url], node="n2", service="test") as bus:
        key, bucket = node_lease_key("n1"), node_lease_bucket("n1")

        async def leased() -> bool:
            try:
                return await current(bus, key, bucket) is not None
            except RucherError:
                return False  # n1 has not made its lease bucket yet

        await until(leased, timeout=60, every=0.2)
        held = await current(bus, key, bucket)
        assert held is not None
        await HaConfigStore(bus).change_resources(
            lambda _: HaResources(resources={f"vm:{vmid}": HaResource(sid=f"vm:{vmid}")})
        )
        await until(lambda: guest_set(a) == [vmid], timeout=30, every=0.1)

        checker = QemuChecker.for_harness(harness, guests=lambda name: name == guest).start()
        try:
            start_guest(a, vmid)
            await until(lambda: checker.running().get(guest) == {"n1"}, timeout=10)
            await asyncio.sleep(3)
            assert checker.running().get(guest) == {"n1"}, "a healthy node keeps its guest"

            expired_at: list[float] = []

            async def watch_expiry() -> None:
                # Direct reads, as the manager makes them: any replica answers, and each
                # removes the key at the TTL on its own, while the expiry marker needs a leader.
                while True:
                    with contextlib.suppress(RucherError):
                        if await current(bus, key, bucket) is None:
                            expired_at.append(boottime())
                            return
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch_expiry())
            await asyncio.sleep(0.5)
            cut_at = boottime()
            harness.cut(a)
            await asyncio.wait_for(watcher, timeout=30)
            # The others may recover the guest now: start it on n2.
            start_guest(b, vmid)
            await until(lambda: checker.running().get(guest) == {"n2"}, timeout=10)
            harness.heal(a)

            async def new_epoch() -> bool:
                record = await current(bus, key, bucket)
                return record is not None and record.token > held.token

            await until(new_epoch, timeout=60, every=0.2)
            await asyncio.sleep(1)
        finally:
            checker.stop()
        runs = checker.log.placements(guest)
        assert [node for node, _, _ in runs] == ["n1", "n2"], runs
        killed = next(i for i in checker.log.intervals if i.node == "n1")
        assert killed.gone_by is not None
        # n1 killed it after the cut and before its lease expired for n2 and n3.
        assert cut_at < killed.gone_by < expired_at[0], (cut_at, killed.gone_by, expired_at)
        checker.assert_no_double_runs()
        # Sampled every 50 ms; a busy 2-core machine may deschedule the sampler for a while
        # (strict checking stays conservative across a gap: a process counts until unseen).
        assert checker.max_gap < 1.0
        print(
            f"cut->killed {killed.gone_by - cut_at:.2f} s, "
            f"killed->lease expired {expired_at[0] - killed.gone_by:.2f} s, "
            f"largest sampling gap {checker.max_gap * 1000:.0f} ms"
        )
