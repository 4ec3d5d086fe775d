"""The HA node watchdog over real NATS: it holds the node lease, and when it cannot renew it
kills the node's HA guests (here stand-in QEMU processes) before the lease can expire."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time

import pytest

from rucher.ha.config import WatchdogSettings
from rucher.ha.lease import start_node_watchdog
from rucher.ha.watchdog import WatchdogState
from rucher.haconfig import HaConfigStore
from rucher.leases import current, node_lease_key
from rucher.proto.ha import HaResource, HaResources
from rucher.proto.streams import node_lease_bucket

from .buses import connected, until

pytestmark = pytest.mark.integration

SETTINGS = WatchdogSettings(
    lease_ttl=4.0,
    renew_interval=0.3,
    kill_margin=1.5,
    tick=0.05,
    destroy_timeout=0.4,
    hw_timeout=1,
    libvirt_uri="test:///default",
)


def fake_qemu(vmid: int) -> subprocess.Popen[bytes]:
    """A process whose command line reads like libvirt's QEMU for ``rucher-VMID``."""
    return subprocess.Popen(
        ["bash", "-c", f'exec -a qemu-system-x86_64 {sys.executable} -c "import time; '
         f'time.sleep(120)" -name guest=rucher-{vmid},debug-threads=on'],
    )  # fmt: skip


async def test_the_watchdog_kills_ha_guests_before_its_lease_can_expire(nats_server, tmp_path):
    ha_vmid, other_vmid = (700_000 + secrets.randbelow(99_999) for _ in range(2))
    leftover, other_guest = fake_qemu(ha_vmid), fake_qemu(other_vmid)
    ha_guest = leftover
    try:
        async with connected(nats_server.url, node="wn1", service="ha") as bus:
            store = HaConfigStore(bus)
            sid = f"vm:{ha_vmid}"
            await store.change_resources(
                lambda _: HaResources(resources={sid: HaResource(sid=sid)})
            )
            watchdog, guests, leader = await start_node_watchdog(
                bus, SETTINGS, holder="wn1-test", state_dir=tmp_path
            )

            async def armed() -> bool:
                return watchdog.state is WatchdogState.ARMED

            await until(armed, timeout=10)
            assert guests() == {ha_vmid}
            # An HA guest left running from before the lease was held is killed at start.
            assert await asyncio.to_thread(leftover.wait, 5) == -9
            ha_guest = fake_qemu(ha_vmid)
            record = await current(bus, node_lease_key("wn1"), node_lease_bucket("wn1"))
            assert record is not None and record.token == watchdog.epoch

            await asyncio.sleep(SETTINGS.lease_ttl)
            assert ha_guest.poll() is None, "a healthy lease must not kill"

            last_renewal_expiry = watchdog.lease.deadline
            nats_server.kill()
            exit_status = await asyncio.to_thread(ha_guest.wait, SETTINGS.lease_ttl * 3)
            killed_at = time.monotonic()
            assert exit_status == -9
            assert watchdog.state is WatchdogState.FENCED
            # The lease the others see runs until at least the last renewal sent + TTL.
            assert killed_at < watchdog.lease.deadline
            assert watchdog.lease.deadline >= last_renewal_expiry
            assert other_guest.poll() is None, "only HA guests are killed"
            assert (tmp_path / "ha-guests.json").read_text() == f"[{ha_vmid}]"
            await guests.stop()
            await leader.stop()
            await watchdog.stop()
    finally:
        for process in (leftover, ha_guest, other_guest):
            process.kill()
            process.wait()
