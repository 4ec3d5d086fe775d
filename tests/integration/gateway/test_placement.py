"""``POST /cluster/qemu``: the scheduler picks the node, the agent confirms or releases the claim.

The real gateway, IAM, scheduler, storage service and compute agent (on the system libvirtd) run
as processes beside one nats-server; claims are read back from the ``allocations`` bucket.
"""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import pytest

from rucher.bus import KV, Bus, RucherError
from rucher.proto.keys import encode_token
from rucher.proto.scheduler import REBALANCE_PLAN, Claim, NodeAllocations, PlanRebalance
from rucher.proto.streams import ALLOCATIONS
from rucher.testing.libvirt import libvirtd  # noqa: F401 - fixture
from rucher.testing.process import ManagedProcess

from ..buses import connected, until
from .stack import ADMIN, ADMIN_PASSWORD, NODE, Api, Stack, logged_in, make_user, service_env
from .test_qemu_helpers import finished, next_vmid, start_agent, wait_agent
from .test_storage_helpers import start_storage, wait_storage

pytest.importorskip("libvirt")

pytestmark = pytest.mark.integration


async def wait_scheduler(bus: Bus, timeout: float = 60.0) -> None:
    """Return once a scheduler answers (its view is loaded by then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await bus.request(REBALANCE_PLAN.address, PlanRebalance(max_moves=1), timeout=2.0)
        except RucherError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            return


@pytest.fixture(scope="module")
def placed(stack: Stack, libvirtd: str) -> Stack:
    """Storage (``local``), the compute agent and then the scheduler beside the module's stack."""
    start_storage(stack, stack.root / "local")
    start_agent(stack, libvirtd)

    async def wait() -> None:
        admin = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
        try:
            await wait_storage(admin)
            await wait_agent(admin)
        finally:
            await admin.close()
        # Started once the node publishes capacity and storage, so its first view has them.
        scheduler = ManagedProcess(
            "scheduler",
            [sys.executable, "-m", "rucher.scheduler"],
            stack.root / "scheduler.log",
            service_env(stack.nats_url, stack.root / "scheduler"),
        )
        stack.processes.append(scheduler)
        scheduler.start()
        async with connected(stack.nats_url) as bus:
            await wait_scheduler(bus)

    asyncio.run(wait())
    return stack


@pytest.fixture
async def bus(placed: Stack) -> AsyncIterator[Bus]:
    """A client bus on the stack's nats-server."""
    async with connected(placed.nats_url) as client:
        yield client


async def claims_of(bus: Bus, vmid: int) -> list[Claim]:
    """The claims of ``vmid`` in the node's allocations document."""
    entry = await KV(bus, ALLOCATIONS, NodeAllocations).get(encode_token(NODE))
    document = entry.value if entry is not None else None
    return [c for c in document.claims if c.vmid == vmid] if document is not None else []


async def test_a_vm_created_through_the_extension_confirms_its_claim_and_destroy_releases_it(
    placed: Stack, admin: Api, bus: Bus
):
    vmid = next_vmid()
    reply = await admin.post(
        "/cluster/qemu",
        vmid=vmid,
        name="placed-vm",
        memory=64,
        cores=1,
        scsi0="local:1,format=qcow2",
        strategy="pack",
    )
    assert reply.status == 200, (reply, placed.logs())
    upid = reply.data
    assert upid.split(":")[1] == NODE
    status = await finished(admin, upid)
    assert status["exitstatus"] == "OK", status
    config = (await admin.get(f"/nodes/{NODE}/qemu/{vmid}/config")).data
    assert config["name"] == "placed-vm"
    assert config["scsi0"].startswith(f"local:{vmid}/vm-{vmid}-disk-0.qcow2")
    [claim] = await claims_of(bus, vmid)
    assert claim.confirmed and claim.node == NODE
    assert claim.resources.memory == 64 << 20
    assert claim.resources.storages == ("local",)

    reply = await admin.delete(f"/nodes/{NODE}/qemu/{vmid}")
    assert reply.status == 200, reply
    assert (await finished(admin, reply.data))["exitstatus"] == "OK"

    async def released() -> bool:
        return not await claims_of(bus, vmid)

    await until(released, timeout=20)


async def test_a_create_that_fails_in_its_task_releases_its_claim(
    placed: Stack, admin: Api, bus: Bus
):
    vmid = next_vmid()
    # A file where the VM's image folder goes: the disk cannot be allocated, the task fails.
    images = placed.root / "local" / "images"
    images.mkdir(parents=True, exist_ok=True)
    (images / str(vmid)).write_text("in the way")
    reply = await admin.post("/cluster/qemu", vmid=vmid, memory=64, scsi0="local:1")
    assert reply.status == 200, (reply, placed.logs())
    status = await finished(admin, reply.data)
    assert status["exitstatus"] != "OK"

    async def released() -> bool:
        return not await claims_of(bus, vmid)

    await until(released, timeout=20)
    assert (await admin.get(f"/nodes/{NODE}/qemu/{vmid}/config")).status == 404


async def test_a_create_the_agent_refuses_is_400_and_gives_the_claim_back(
    placed: Stack, admin: Api, bus: Bus
):
    vmid = next_vmid()
    reply = await admin.post(
        "/cluster/qemu", vmid=vmid, memory=64, net0="virtio,bridge=nosuchbridge0"
    )
    assert reply.status == 400, reply
    assert "net0" in reply.errors

    async def released() -> bool:
        return not await claims_of(bus, vmid)

    await until(released, timeout=20)


async def test_an_impossible_placement_explains_itself(placed: Stack, admin: Api, bus: Bus):
    vmid = next_vmid()
    excluded = await admin.post("/cluster/qemu", vmid=vmid, memory=64, **{"exclude-nodes": NODE})
    assert excluded.status == 503, excluded
    message = excluded.body["message"]
    assert f"no node can run VM {vmid}" in message, message
    assert "candidates removed 1" in message, message

    flags = await admin.post(
        "/cluster/qemu", vmid=vmid, memory=64, **{"cpu-flags": "nosuchflag;aes"}
    )
    assert flags.status == 400, flags
    assert "nosuchflag" in flags.errors["cpu-flags"], flags

    huge = await admin.post("/cluster/qemu", vmid=vmid, memory=1 << 24)  # 16 TiB
    assert huge.status == 400, huge
    assert "more than any node has" in huge.errors["memory"], huge
    assert not await claims_of(bus, vmid)


async def test_the_extension_needs_vm_allocate_and_names_bad_hints(placed: Stack, admin: Api):
    bad = await admin.post("/cluster/qemu", vmid=next_vmid(), strategy="scatter")
    assert bad.status == 400 and "strategy" in bad.errors, bad
    anonymous = Api(placed)
    try:
        denied = await anonymous.post("/cluster/qemu", vmid=next_vmid())
    finally:
        await anonymous.close()
    assert denied.status == 401, denied
    userid = await make_user(admin)
    user = await logged_in(placed, userid, "user-pass-1")
    try:
        forbidden = await user.post("/cluster/qemu", vmid=next_vmid(), memory=64)
    finally:
        await user.close()
    assert forbidden.status == 403, forbidden
    assert "VM.Allocate" in forbidden.body["message"], forbidden
