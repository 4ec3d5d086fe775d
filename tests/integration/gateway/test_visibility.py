"""Lists show only what the caller may see, follow the store, and follow ACL changes at once."""

from __future__ import annotations

import time

import pytest

from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished, CpuArch, NodeCapacity
from rucher.proto.common import PowerState
from rucher.proto.guest import GuestType
from rucher.proto.storage import (
    STATUS_PUBLISHED,
    ContentType,
    StorageStatus,
    StorageStatusPublished,
    StorageType,
)

from ..buses import connected, until
from .stack import NODE, grant, logged_in, make_user, token_client, unique

pytestmark = pytest.mark.integration

PASSWORD = "visible-pass-1"


@pytest.fixture
async def bus(stack):
    async with connected(stack.nats_url, node=NODE, service="visibility") as connection:
        yield connection


async def _publish_cluster(bus) -> tuple[int, int]:
    registry = GuestRegistry(bus)
    first = await registry.register(
        guest_type=GuestType.QEMU, node=NODE, config={"name": "a", "memory": "1024"}, lock=None
    )
    second = await registry.register(
        guest_type=GuestType.LXC, node=NODE, config={"hostname": "b"}, lock=None
    )
    capacity = NodeCapacity(
        node=NODE,
        arch=CpuArch.X86_64,
        cpu_model="visible",
        cpus=4,
        sockets=1,
        memory_total=8 << 30,
        memory_used=1 << 30,
        time=time.time(),
    )
    await bus.publish(
        NODE_CAPACITY_PUBLISHED.to(node=NODE),
        CapacityPublished(event_id=unique("e"), node=NODE, time=time.time(), capacity=capacity),
    )
    storage = StorageStatus(
        storage="local",
        storage_type=StorageType.DIR,
        content=(ContentType.IMAGES,),
        shared=False,
        active=True,
        enabled=True,
        total=100,
        used=10,
    )
    await bus.publish(
        STATUS_PUBLISHED.to(node=NODE),
        StorageStatusPublished(
            event_id=unique("e"), node=NODE, time=time.time(), storages=(storage,)
        ),
    )
    return first.vmid, second.vmid


async def _shown(api, **params) -> dict[str, dict]:
    reply = await api.get("/cluster/resources", **params)
    assert reply.status == 200, reply
    return {entry["id"]: entry for entry in reply.data}


async def test_resources_follow_the_callers_rights_and_their_changes(stack, admin, bus):
    first, second = await _publish_cluster(bus)
    await until(lambda: _has(admin, f"qemu/{first}"), timeout=10)
    userid = await make_user(admin, grants=[(f"/vms/{first}", ["VM.Audit"])], password=PASSWORD)
    user = await logged_in(stack, userid, PASSWORD)

    shown = await _shown(user)
    assert f"qemu/{first}" in shown and f"lxc/{second}" not in shown
    assert shown[f"qemu/{first}"]["maxmem"] == 1024 << 20
    assert shown[f"node/{NODE}"] == {
        "id": f"node/{NODE}",
        "type": "node",
        "node": NODE,
        "status": "online",
    }
    assert not [key for key in shown if key.startswith("storage/")]

    # Rights granted now show at the next request: the cached answer is not reused.
    await grant(admin, "/storage/local", ["Datastore.Audit"], users=userid)
    await grant(admin, f"/nodes/{NODE}", ["Sys.Audit"], users=userid)
    shown = await _shown(user)
    assert shown[f"storage/{NODE}/local"]["maxdisk"] == 100
    assert shown[f"node/{NODE}"]["maxmem"] == 8 << 30
    assert set(await _shown(user, type="vm")) == {f"qemu/{first}"}

    # The read model follows the store: a run state, then the guest's removal.
    await bus.publish(
        compute.GUEST_STATE_CHANGED.to(node=NODE),
        compute.VmStateChanged(
            event_id=unique("e"), node=NODE, time=time.time(), vmid=first, state=PowerState.RUNNING
        ),
    )
    await until(lambda: _status(user, f"qemu/{first}", "running"), timeout=10)
    await GuestRegistry(bus).remove(first)
    await until(lambda: _gone(user, f"qemu/{first}"), timeout=10)
    await user.close()


async def _has(api, resource: str) -> bool:
    return resource in await _shown(api)


async def _gone(api, resource: str) -> bool:
    return resource not in await _shown(api)


async def _status(api, resource: str, status: str) -> bool:
    return (await _shown(api)).get(resource, {}).get("status") == status


async def test_revoking_a_right_applies_to_the_next_request(stack, admin):
    userid = await make_user(admin, password=PASSWORD)
    role = await grant(admin, "/", ["Sys.Audit"], users=userid)
    user = await logged_in(stack, userid, PASSWORD)
    assert (await user.get("/cluster/status")).status == 200
    reply = await admin.put("/access/acl", path="/", roles=role, users=userid, delete=1)
    assert reply.status == 200
    assert (await user.get("/cluster/status")).status == 403
    await user.close()


async def test_users_groups_and_acl_lists_are_cut_to_the_callers_rights(stack, admin):
    group, other_group = unique("g"), unique("g")
    for groupid in (group, other_group):
        assert (await admin.post("/access/groups", groupid=groupid)).status == 200
    member = f"{unique('m')}@pve"
    stranger = f"{unique('s')}@pve"
    assert (await admin.post("/access/users", userid=member, groups=group)).status == 200
    assert (await admin.post("/access/users", userid=stranger, groups=other_group)).status == 200
    userid = await make_user(admin, password=PASSWORD)
    user = await logged_in(stack, userid, PASSWORD)
    assert [entry["userid"] for entry in (await user.get("/access/users")).data] == [userid]
    assert (await user.get("/access/groups")).data == []
    assert (await user.get("/access/acl")).data == []

    await grant(admin, f"/access/groups/{group}", ["User.Modify"], users=userid)
    await grant(admin, "/vms/4242", ["Permissions.Modify"], users=userid)
    await grant(admin, "/vms/4242", ["VM.Audit"], users=member)
    listed = {entry["userid"] for entry in (await user.get("/access/users")).data}
    assert listed == {userid, member}
    assert [entry["groupid"] for entry in (await user.get("/access/groups")).data] == [group]
    paths = {entry["path"] for entry in (await user.get("/access/acl")).data}
    assert paths == {"/vms/4242"}
    # Managing the member's group lets the user read and change that member, not the stranger.
    assert (await user.get(f"/access/users/{member}")).status == 200
    assert (await user.get(f"/access/users/{stranger}")).status == 403
    assert (await user.put(f"/access/users/{member}", comment="x", groups=group)).status == 200
    await user.close()


async def test_pools_and_second_factors_lists(stack, admin):
    mine, theirs = unique("p"), unique("p")
    for poolid in (mine, theirs):
        assert (await admin.post("/pools", poolid=poolid)).status == 200
    userid = await make_user(admin, grants=[(f"/pool/{mine}", ["Pool.Audit"])], password=PASSWORD)
    user = await logged_in(stack, userid, PASSWORD)
    assert [pool["poolid"] for pool in (await user.get("/pools")).data] == [mine]
    assert (await user.get(f"/pools/{theirs}")).status == 403
    assert (await user.get("/access/tfa")).data == []
    await user.close()


async def test_permissions_of_others_need_sys_audit_on_access(stack, admin):
    userid = await make_user(admin, grants=[("/vms", ["VM.Audit"])], password=PASSWORD)
    other = await make_user(admin)
    user = await logged_in(stack, userid, PASSWORD)
    assert (await user.get("/access/permissions", userid=other)).status == 403
    token = await user.post(f"/access/users/{userid}/token/mine", privsep=0)
    assert token.status == 200
    own = await user.get("/access/permissions", userid=token.data["full-tokenid"])
    assert own.status == 200 and "VM.Audit" in own.data["/vms"]
    with_token = token_client(stack, token.data["full-tokenid"], token.data["value"])
    assert (await with_token.get("/access/permissions")).data == own.data
    await grant(admin, "/access", ["Sys.Audit"], users=userid)
    assert (await user.get("/access/permissions", userid=other)).status == 200
    await user.close()
    await with_token.close()


async def test_next_id_and_cluster_status(admin, bus):
    taken = (
        await GuestRegistry(bus).register(
            guest_type=GuestType.QEMU, node=NODE, config={}, vmid=777_000, lock=None
        )
    ).vmid
    reply = await admin.get("/cluster/nextid", vmid=taken)
    assert reply.status == 409 and reply.errors == {"vmid": f"VM {taken} already exists"}
    assert (await admin.get("/cluster/nextid", vmid=777_001)).data == 777_001
    free = (await admin.get("/cluster/nextid")).data
    assert isinstance(free, int) and free >= 100
    assert free not in {entry.vmid for entry in await GuestRegistry(bus).list()}

    status = (await admin.get("/cluster/status")).data
    cluster = next(entry for entry in status if entry["type"] == "cluster")
    assert cluster["quorate"] == 1 and cluster["nodes"] >= 1 and cluster["name"] == "rucher"
    local = next(entry for entry in status if entry["type"] == "node" and entry["name"] == NODE)
    assert (local["online"], local["local"], local["id"]) == (1, 1, f"node/{NODE}")
