"""HA fencing tokens over real NATS: the compute agent refuses a start under a stale epoch."""

from __future__ import annotations

import pytest

from rucher.bus.client import new_id
from rucher.leases import Lease, ensure_node_lease_bucket, node_lease_name
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.task import TaskStatus

from .buses import connected
from .test_compute_agent import start_agent, stop_agent, task_end, wait_agent

pytestmark = pytest.mark.integration

NODE = "fn1"
USER = "root@pam"
VMID = 4711


async def test_a_stale_epoch_fails_the_start_and_the_current_one_starts(nats_server, tmp_path):
    agent = start_agent(
        nats_server.url, tmp_path / "state", NODE, RUCHER_LIBVIRT_URI="test:///default"
    )
    try:
        async with connected(nats_server.url, node=NODE, service="ha") as bus:
            await wait_agent(bus, agent, NODE)
            accepted = await bus.request(
                compute.GUEST_CREATE.to(node=NODE),
                compute.VmCreate(
                    command_id=new_id(), vmid=VMID, user=USER, config={"memory": "64"}
                ),
            )
            assert (await task_end(bus, accepted.upid)).exitstatus == "OK"

            await ensure_node_lease_bucket(bus, NODE)
            lease_name = node_lease_name(NODE)
            old = Lease.named(bus, lease_name, holder="incarnation-1", ttl=5.0)
            stale = await old.acquire(timeout=10)
            await old.release()
            new = Lease.named(bus, lease_name, holder="incarnation-2", ttl=5.0)
            current = await new.acquire(timeout=10)
            assert current > stale

            def start(epoch: int) -> compute.VmStart:
                return compute.VmStart(
                    command_id=new_id(),
                    vmid=VMID,
                    user=USER,
                    fence_lease=lease_name,
                    fence_epoch=epoch,
                )

            refused = await bus.request(compute.GUEST_START.to(node=NODE), start(stale))
            ended = await task_end(bus, refused.upid)
            assert ended.status is TaskStatus.STOPPED
            assert ended.exitstatus is not None
            assert f"fencing token {stale} of lease {lease_name} is stale" in ended.exitstatus
            assert f"current: {current}" in ended.exitstatus
            status = await bus.request(
                compute.GUEST_STATUS.to(node=NODE), compute.VmStatusQuery(vmid=VMID)
            )
            assert status.status is PowerState.STOPPED

            accepted = await bus.request(compute.GUEST_START.to(node=NODE), start(current))
            assert (await task_end(bus, accepted.upid)).exitstatus == "OK"
            status = await bus.request(
                compute.GUEST_STATUS.to(node=NODE), compute.VmStatusQuery(vmid=VMID)
            )
            assert status.status is PowerState.RUNNING
            await new.release()
    finally:
        stop_agent(agent)
