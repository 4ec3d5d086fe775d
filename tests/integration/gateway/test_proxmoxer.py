"""Acceptance: the real ``proxmoxer`` client (HTTPS backend) drives Rucher as it drives Proxmox."""

from __future__ import annotations

import asyncio
import time

import pytest
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from rucher.guests import GuestRegistry
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished, CpuArch, NodeCapacity
from rucher.proto.guest import GuestType

from ..buses import connected
from .stack import ADMIN, ADMIN_PASSWORD, NODE, Stack, unique

pytestmark = pytest.mark.integration


def client(stack: Stack, **auth: str) -> ProxmoxAPI:
    """proxmoxer against the test stack, with a self-signed certificate."""
    return ProxmoxAPI("127.0.0.1", port=stack.port, backend="https", verify_ssl=False, **auth)


def seed(stack: Stack) -> tuple[int, int]:
    """Two VMs and the node's capacity, written to the cluster store as the agents would."""

    async def write() -> tuple[int, int]:
        async with connected(stack.nats_url, node=NODE, service="acceptance") as bus:
            registry = GuestRegistry(bus)
            first = await registry.register(
                guest_type=GuestType.QEMU, node=NODE, config={"name": "web"}, lock=None
            )
            second = await registry.register(
                guest_type=GuestType.QEMU, node=NODE, config={"name": "db"}, lock=None
            )
            capacity = NodeCapacity(
                node=NODE,
                arch=CpuArch.X86_64,
                cpu_model="acceptance",
                cpus=8,
                sockets=1,
                memory_total=16 << 30,
                memory_used=2 << 30,
                time=time.time(),
            )
            await bus.publish(
                NODE_CAPACITY_PUBLISHED.to(node=NODE),
                CapacityPublished(
                    event_id=unique("e"), node=NODE, time=time.time(), capacity=capacity
                ),
            )
            return first.vmid, second.vmid

    return asyncio.run(write())


def vm_ids(resources: list[dict]) -> set[int]:
    return {entry["vmid"] for entry in resources if entry["type"] == "qemu"}


def eventually(check, timeout: float = 10.0):
    """Retry ``check`` until it returns a truthy value (the read model follows the store)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_proxmoxer_end_to_end(stack):
    web, db = seed(stack)

    # Password login as the administrator.
    admin = client(stack, user=ADMIN, password=ADMIN_PASSWORD)
    assert admin.version.get()["release"] == "9.1"

    # A pve user, a group holding it, an ACL, and a privilege-separated API token.
    alice, group = f"{unique('alice')}@pve", unique("ops")
    admin.access.groups.post(groupid=group, comment="operators")
    admin.access.users.post(userid=alice, password="alice-pass-1", groups=group, comment="acc")
    admin.access.acl.put(path="/", roles="PVEAuditor", groups=group)
    token = admin.access.users(alice).token("ci").post(privsep=1, comment="ci token")
    assert token["full-tokenid"] == f"{alice}!ci" and token["value"]
    admin.access.acl.put(path=f"/vms/{web}", roles="PVEVMAdmin", tokens=token["full-tokenid"])
    members = admin.access.groups(group).get()["members"]
    assert members == [alice]

    # Log in again, with the token.
    with_token = client(stack, user=alice, token_name="ci", token_value=token["value"])
    as_alice = client(stack, user=alice, password="alice-pass-1")

    # The token sees only what its own ACL grants, though its user sees more...
    assert eventually(lambda: {web, db} <= vm_ids(as_alice.cluster.resources.get(type="vm")))
    assert vm_ids(with_token.cluster.resources.get(type="vm")) == {web}
    assert as_alice.nodes(NODE).status.get()["cpuinfo"]["cpus"] == 8
    with pytest.raises(ResourceException) as refused:
        with_token.nodes(NODE).status.get()
    assert refused.value.status_code == 403
    # ...and never more than its user: PVEVMAdmin on the VM, but alice only audits it.
    assert "VM.Allocate" not in with_token.access.permissions.get()[f"/vms/{web}"]
    with pytest.raises(ResourceException) as refused:
        with_token.access.groups.post(groupid=unique("nope"))
    assert refused.value.status_code == 403

    # The reads every client starts with.
    permissions = with_token.access.permissions.get()
    assert set(permissions) == {f"/vms/{web}"}
    assert "VM.Audit" in permissions[f"/vms/{web}"]
    nodes = with_token.nodes.get()
    assert [node["node"] for node in nodes] == [NODE]
    assert "maxmem" not in nodes[0]  # no Sys.Audit on the node: no figures
    assert as_alice.nodes.get()[0]["maxmem"] == 16 << 30
    assert set(as_alice.access.permissions.get()) >= {"/"}
    resources = with_token.cluster.resources.get()
    assert {entry["type"] for entry in resources} == {"qemu", "node"}

    # Renew the ticket by logging in with it as the password.
    ticket, _csrf = as_alice.get_tokens()
    renewed = client(stack, user=alice, password=ticket)
    new_ticket, new_csrf = renewed.get_tokens()
    assert new_ticket.startswith(f"PVE:{alice}:") and new_csrf
    assert vm_ids(renewed.cluster.resources.get(type="vm")) >= {web, db}

    # A wrong password fails the way proxmoxer expects of Proxmox.
    with pytest.raises(Exception, match="Couldn't authenticate"):
        client(stack, user=alice, password="wrong")
