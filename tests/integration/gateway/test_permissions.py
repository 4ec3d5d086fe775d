"""The permission matrix: every endpoint, as its Proxmox schema permission says.

For each endpoint of the extracted schema: without credentials 401 (unless open to the world);
an authenticated user without the privileges the endpoint's clause names gets 403; a user holding
exactly those privileges on the path succeeds. The privileges are derived from the schema's
``check`` clause itself, so the matrix follows the schema rather than a copy of it. Endpoints
open to every user (``user: all``) answer any authenticated caller, and the handlers' own rules
(task owners, other users' permissions) are granted here by hand.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rucher.gateway.__main__ import bundled_schema
from rucher.guests import GuestRegistry
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished, CpuArch, NodeCapacity
from rucher.proto.guest import GuestType
from rucher.proto.task import TaskLogLine, TaskState
from rucher.pve import totp
from rucher.pve.schema import Endpoint
from rucher.tasks import TaskStore, UpidMinter

from ..buses import connected
from .stack import ADMIN, ADMIN_PASSWORD, NODE, Api, grant, logged_in, make_user, unique
from .test_gateway_gpu_helpers import start_gpu, wait_gpu
from .test_qemu_helpers import finished, make_vm, next_vmid, start_agent, wait_agent
from .test_storage_helpers import make_volume, start_storage, wait_storage

pytestmark = pytest.mark.integration

SCHEMA = bundled_schema()
PASSWORD = "matrix-pass-1"
PEER = "n2"
Params = dict[str, Any]
Prepare = Callable[[Api, "World"], Awaitable[Params]]


@dataclass
class World:
    """Objects the cases act on, made once per module."""

    vmid: int
    upid: str
    dirs: Path


@dataclass
class Case:
    """How to call one endpoint: its parameters (made fresh for each call that consumes them),
    and the grants a caller needs beyond the schema's clause (handlers' own rules)."""

    prepare: Prepare
    grants: list[tuple[str, list[str]]] = field(default_factory=list)
    # What a caller holding the privileges gets: 200, or the handler's own answer where this
    # stack cannot do the work (consoles need real QEMU: test_qemu_console.py covers them).
    expect: int = 200


async def _nothing(admin: Api, world: World) -> Params:
    return {}


def _fixed(**params: Any) -> Prepare:
    async def prepare(admin: Api, world: World) -> Params:
        return dict(params)

    return prepare


def _plus(base: Prepare, **extra: Any) -> Prepare:
    """``base``'s parameters and ``extra``."""

    async def prepare(admin: Api, world: World) -> Params:
        return {**(await base(admin, world)), **extra}

    return prepare


def _named(name: str, prefix: str, **extra: Any) -> Prepare:
    """A fresh unique ``name`` each call (objects a successful call creates)."""

    async def prepare(admin: Api, world: World) -> Params:
        return {name: unique(prefix), **extra}

    return prepare


async def _victim(admin: Api, world: World) -> Params:
    return {"userid": await make_user(admin)}


async def _new_user(admin: Api, world: World) -> Params:
    return {"userid": f"{unique('new')}@pve", "password": "new-user-pass"}


async def _victim_token(admin: Api, world: World) -> Params:
    userid = await make_user(admin)
    reply = await admin.post(f"/access/users/{userid}/token/t1")
    assert reply.status == 200, reply
    return {"userid": userid, "tokenid": "t1"}


async def _victim_new_token(admin: Api, world: World) -> Params:
    return {"userid": await make_user(admin), "tokenid": "fresh"}


async def _group(admin: Api, world: World) -> Params:
    groupid = unique("g")
    assert (await admin.post("/access/groups", groupid=groupid)).status == 200
    return {"groupid": groupid}


async def _role(admin: Api, world: World) -> Params:
    roleid = unique("R")
    assert (await admin.post("/access/roles", roleid=roleid, privs="VM.Audit")).status == 200
    return {"roleid": roleid}


async def _pool(admin: Api, world: World) -> Params:
    poolid = unique("p")
    assert (await admin.post("/pools", poolid=poolid)).status == 200
    return {"poolid": poolid}


async def _realm(admin: Api, world: World) -> Params:
    realm = unique("oidc")
    reply = await admin.post(
        "/access/domains",
        realm=realm,
        type="openid",
        **{"issuer-url": "http://127.0.0.1:9/", "client-id": "rucher"},
    )
    assert reply.status == 200, reply
    return {"realm": realm}


async def _new_realm(admin: Api, world: World) -> Params:
    return {
        "realm": unique("oidc"),
        "type": "openid",
        "issuer-url": "http://127.0.0.1:9/",
        "client-id": "rucher",
    }


def _totp_params(userid: str) -> Params:
    spec = totp.TotpSpec(secret=totp.new_secret())
    return {
        "userid": userid,
        "type": "totp",
        "totp": totp.make_uri(spec, userid),
        "value": totp.code_now(spec, time.time()),
    }


async def _new_factor(admin: Api, world: World) -> Params:
    return _totp_params(await make_user(admin))


async def _factor(admin: Api, world: World) -> Params:
    params = _totp_params(await make_user(admin))
    userid = params.pop("userid")
    reply = await admin.post(f"/access/tfa/{userid}", password=ADMIN_PASSWORD, **params)
    assert reply.status == 200, reply
    return {"userid": userid, "id": reply.data["id"]}


async def _task(admin: Api, world: World) -> Params:
    return {"node": NODE, "upid": world.upid}


async def _acl(admin: Api, world: World) -> Params:
    return {"path": f"/vms/{world.vmid}", "roles": "PVEAuditor", "users": await make_user(admin)}


async def _pool_members(admin: Api, world: World) -> Params:
    return {**(await _pool(admin, world)), "vms": str(world.vmid)}


async def _world_vm(admin: Api, world: World) -> Params:
    return {"node": NODE, "vmid": world.vmid}


async def _new_vm(admin: Api, world: World) -> Params:
    return {"node": NODE, "vmid": next_vmid(), "memory": 64}


def _vm(**state: bool) -> Prepare:
    """A fresh VM in the given state (``start``, ``paused``), made by the administrator."""

    async def prepare(admin: Api, world: World) -> Params:
        return {"node": NODE, "vmid": await make_vm(admin, **state)}

    return prepare


async def _snapshot(admin: Api, world: World) -> Params:
    """A fresh stopped VM with one snapshot, ``snap``."""
    vmid = await make_vm(admin)
    reply = await admin.post(f"/nodes/{NODE}/qemu/{vmid}/snapshot", snapname="snap")
    assert reply.status == 200, reply
    assert (await finished(admin, reply.data))["exitstatus"] == "OK"
    return {"node": NODE, "vmid": vmid, "snapname": "snap"}


async def _clone(admin: Api, world: World) -> Params:
    return {"node": NODE, "vmid": await make_vm(admin), "newid": next_vmid()}


async def _disk_vm(admin: Api, world: World) -> Params:
    vmid = await make_vm(admin, scsi0="local:1")
    return {"node": NODE, "vmid": vmid, "disk": "scsi0", "size": "+1M"}


async def _new_storage(admin: Api, world: World) -> Params:
    storage = unique("s")
    return {"storage": storage, "type": "dir", "path": str(world.dirs / storage)}


async def _storage(admin: Api, world: World) -> Params:
    params = await _new_storage(admin, world)
    assert (await admin.post("/storage", **params)).status == 200
    return {"storage": params["storage"]}


_disks = itertools.count(1)


async def _new_volume(admin: Api, world: World) -> Params:
    vmid = next_vmid()
    return {"node": NODE, "storage": "local", "vmid": vmid, "filename": f"vm-{vmid}-disk-0",
            "size": "1M"}  # fmt: skip


async def _volume(admin: Api, world: World) -> Params:
    volid = await make_volume(admin, next_vmid(), f"disk-{next(_disks)}")
    return {"node": NODE, "storage": "local", "volume": volid}


async def _upload(admin: Api, world: World) -> Params:
    return {"node": NODE, "storage": "local", "content": "iso",
            "filename": (f"{unique('u')}.iso", b"matrix")}  # fmt: skip


async def _download(admin: Api, world: World) -> Params:
    return {"node": NODE, "storage": "local", "content": "iso", "filename": f"{unique('i')}.iso",
            "url": "http://127.0.0.1:9/nothing.iso"}  # fmt: skip


async def _new_ha_resource(admin: Api, world: World) -> Params:
    return {"sid": f"vm:{await make_vm(admin)}"}


async def _ha_resource(admin: Api, world: World) -> Params:
    params = await _new_ha_resource(admin, world)
    assert (await admin.post("/cluster/ha/resources", **params)).status == 200
    return params


async def _new_ha_rule(admin: Api, world: World) -> Params:
    resource = await _ha_resource(admin, world)
    return {"rule": unique("r"), "type": "node-affinity", "resources": resource["sid"],
            "nodes": NODE}  # fmt: skip


async def _ha_rule(admin: Api, world: World) -> Params:
    params = await _new_ha_rule(admin, world)
    assert (await admin.post("/cluster/ha/rules", **params)).status == 200
    return {"rule": params["rule"]}


async def _ha_group(admin: Api, world: World) -> Params:
    group = unique("g")
    assert (await admin.post("/cluster/ha/groups", group=group, nodes=NODE)).status == 200
    return {"group": group}


GPU_MAP = f"node={NODE},path=0000:41:00.0,id=10de:26b9"
PCI = {"node": NODE, "pci-id-or-mapping": "0000:43:00.0"}


async def _mapping(admin: Api, world: World) -> Params:
    mapping = unique("m")
    assert (await admin.post("/cluster/mapping/pci", id=mapping, map=GPU_MAP)).status == 200
    return {"id": mapping}


NODE_AUDIT = [(f"/nodes/{NODE}", ["Sys.Audit"])]
LOCAL = {"node": NODE, "storage": "local"}
# Volumes: the handler's check_volume_access, which Datastore.Allocate on the storage passes.
VOLUME_ACCESS = [("/storage/local", ["Datastore.Allocate"])]

CASES: dict[tuple[str, str], Case] = {
    ("GET", "/version"): Case(_nothing),
    ("GET", "/nodes"): Case(_nothing),
    ("GET", "/nodes/{node}/status"): Case(_fixed(node=NODE)),
    ("GET", "/nodes/{node}/tasks"): Case(_fixed(node=NODE)),
    ("GET", "/nodes/{node}/tasks/{upid}"): Case(_task),
    ("DELETE", "/nodes/{node}/tasks/{upid}"): Case(_task, [(f"/nodes/{NODE}", ["Sys.Modify"])]),
    ("GET", "/nodes/{node}/tasks/{upid}/status"): Case(_task, NODE_AUDIT),
    ("GET", "/nodes/{node}/tasks/{upid}/log"): Case(_task, NODE_AUDIT),
    ("GET", "/nodes/{node}/qemu"): Case(_fixed(node=NODE)),
    ("POST", "/nodes/{node}/qemu"): Case(_new_vm, [("/vms", ["VM.Allocate"])]),
    ("DELETE", "/nodes/{node}/qemu/{vmid}"): Case(_vm()),
    ("GET", "/nodes/{node}/qemu/{vmid}/config"): Case(_world_vm),
    ("POST", "/nodes/{node}/qemu/{vmid}/config"): Case(_plus(_world_vm, description="x")),
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"): Case(_plus(_world_vm, description="y")),
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current"): Case(_world_vm),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"): Case(_vm()),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop"): Case(_vm(start=True)),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown"): Case(_vm(start=True)),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/reboot"): Case(_vm(start=True)),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/reset"): Case(_vm(start=True)),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/suspend"): Case(_vm(start=True)),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/resume"): Case(_vm(paused=True)),
    ("GET", "/nodes/{node}/qemu/{vmid}/migrate"): Case(_world_vm),
    ("POST", "/nodes/{node}/qemu/{vmid}/migrate"): Case(_plus(_vm(), target=PEER)),
    ("GET", "/nodes/{node}/qemu/{vmid}/snapshot"): Case(_world_vm),
    ("POST", "/nodes/{node}/qemu/{vmid}/snapshot"): Case(_plus(_vm(), snapname="matrix")),
    ("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}"): Case(_snapshot),
    ("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}"): Case(_snapshot),
    ("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config"): Case(_snapshot),
    ("PUT", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config"): Case(
        _plus(_snapshot, description="matrix")
    ),
    ("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback"): Case(_snapshot),
    ("GET", "/nodes/{node}/qemu/{vmid}/pending"): Case(_world_vm),
    ("GET", "/nodes/{node}/qemu/{vmid}/rrddata"): Case(_plus(_world_vm, timeframe="hour")),
    # The world's guest has no socket serial port (and libvirt's test driver no consoles): the
    # agent answers 400 once the caller may ask.
    ("POST", "/nodes/{node}/qemu/{vmid}/termproxy"): Case(_world_vm, expect=400),
    ("GET", "/nodes/{node}/qemu/{vmid}/vncwebsocket"): Case(
        _plus(_world_vm, port=5900, vncticket="PVEVNC:none"), expect=400
    ),
    ("POST", "/nodes/{node}/qemu/{vmid}/template"): Case(_vm()),
    ("POST", "/nodes/{node}/qemu/{vmid}/clone"): Case(_clone),
    ("PUT", "/nodes/{node}/qemu/{vmid}/resize"): Case(_disk_vm),
    ("GET", "/storage"): Case(_nothing),
    ("POST", "/storage"): Case(_new_storage),
    ("GET", "/storage/{storage}"): Case(_storage),
    ("PUT", "/storage/{storage}"): Case(_plus(_storage, content="images,iso")),
    ("DELETE", "/storage/{storage}"): Case(_storage),
    ("GET", "/nodes/{node}/storage"): Case(_fixed(node=NODE)),
    ("GET", "/nodes/{node}/storage/{storage}/status"): Case(_fixed(**LOCAL)),
    ("GET", "/nodes/{node}/storage/{storage}/content"): Case(_fixed(**LOCAL)),
    ("POST", "/nodes/{node}/storage/{storage}/content"): Case(_new_volume),
    ("GET", "/nodes/{node}/storage/{storage}/content/{volume}"): Case(_volume, VOLUME_ACCESS),
    ("PUT", "/nodes/{node}/storage/{storage}/content/{volume}"): Case(
        _plus(_volume, notes="matrix"), VOLUME_ACCESS
    ),
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"): Case(_volume, VOLUME_ACCESS),
    ("POST", "/nodes/{node}/storage/{storage}/download-url"): Case(_download),
    ("POST", "/nodes/{node}/storage/{storage}/upload"): Case(_upload),
    ("GET", "/cluster/status"): Case(_nothing),
    ("GET", "/cluster/resources"): Case(_nothing),
    ("GET", "/cluster/nextid"): Case(_nothing),
    ("GET", "/cluster/tasks"): Case(_nothing),
    ("GET", "/cluster/ha"): Case(_nothing),
    ("GET", "/cluster/ha/resources"): Case(_nothing),
    ("POST", "/cluster/ha/resources"): Case(_new_ha_resource),
    ("GET", "/cluster/ha/resources/{sid}"): Case(_ha_resource),
    ("PUT", "/cluster/ha/resources/{sid}"): Case(_plus(_ha_resource, comment="matrix")),
    ("DELETE", "/cluster/ha/resources/{sid}"): Case(_ha_resource),
    ("POST", "/cluster/ha/resources/{sid}/migrate"): Case(_plus(_ha_resource, node=NODE)),
    ("POST", "/cluster/ha/resources/{sid}/relocate"): Case(_plus(_ha_resource, node=NODE)),
    ("GET", "/cluster/ha/rules"): Case(_nothing),
    ("POST", "/cluster/ha/rules"): Case(_new_ha_rule),
    ("GET", "/cluster/ha/rules/{rule}"): Case(_ha_rule),
    ("PUT", "/cluster/ha/rules/{rule}"): Case(
        _plus(_ha_rule, type="node-affinity", comment="matrix")
    ),
    ("DELETE", "/cluster/ha/rules/{rule}"): Case(_ha_rule),
    ("GET", "/cluster/ha/groups"): Case(_nothing),
    ("POST", "/cluster/ha/groups"): Case(_named("group", "g", nodes=NODE)),
    ("GET", "/cluster/ha/groups/{group}"): Case(_ha_group),
    ("PUT", "/cluster/ha/groups/{group}"): Case(_plus(_ha_group, comment="matrix")),
    ("DELETE", "/cluster/ha/groups/{group}"): Case(_ha_group),
    ("GET", "/cluster/ha/status"): Case(_nothing),
    ("GET", "/cluster/ha/status/current"): Case(_nothing),
    ("GET", "/cluster/ha/status/manager_status"): Case(_nothing),
    ("POST", "/cluster/ha/status/disarm-ha"): Case(_fixed(**{"resource-mode": "freeze"})),
    ("POST", "/cluster/ha/status/arm-ha"): Case(_nothing),
    ("GET", "/cluster/mapping"): Case(_nothing),
    ("GET", "/cluster/mapping/pci"): Case(_nothing),
    ("POST", "/cluster/mapping/pci"): Case(_named("id", "m", map=GPU_MAP)),
    ("GET", "/cluster/mapping/pci/{id}"): Case(_mapping),
    ("PUT", "/cluster/mapping/pci/{id}"): Case(_plus(_mapping, description="matrix")),
    ("DELETE", "/cluster/mapping/pci/{id}"): Case(_mapping),
    ("GET", "/nodes/{node}/hardware"): Case(_fixed(node=NODE)),
    ("GET", "/nodes/{node}/hardware/pci"): Case(_fixed(node=NODE)),
    ("GET", "/nodes/{node}/hardware/pci/{pci-id-or-mapping}"): Case(_fixed(**PCI)),
    ("GET", "/nodes/{node}/hardware/pci/{pci-id-or-mapping}/mdev"): Case(_fixed(**PCI)),
    ("GET", "/pools"): Case(_nothing),
    ("POST", "/pools"): Case(_named("poolid", "p")),
    ("GET", "/pools/{poolid}"): Case(_pool),
    ("PUT", "/pools/{poolid}"): Case(
        _pool_members, [("/vms", ["Permissions.Modify"])]
    ),  # adding a guest needs rights on its ACL too
    ("DELETE", "/pools/{poolid}"): Case(_pool),
    ("GET", "/access"): Case(_nothing),
    ("PUT", "/access/password"): Case(
        _plus(_victim, password="changed-pass-1", **{"confirmation-password": PASSWORD})
    ),
    ("GET", "/access/permissions"): Case(_nothing),
    ("GET", "/access/users"): Case(_nothing),
    ("POST", "/access/users"): Case(_new_user),
    ("GET", "/access/users/{userid}"): Case(_victim),
    ("PUT", "/access/users/{userid}"): Case(_plus(_victim, comment="changed")),
    ("DELETE", "/access/users/{userid}"): Case(_victim),
    ("GET", "/access/users/{userid}/token"): Case(_victim),
    ("GET", "/access/users/{userid}/token/{tokenid}"): Case(_victim_token),
    ("POST", "/access/users/{userid}/token/{tokenid}"): Case(_victim_new_token),
    ("PUT", "/access/users/{userid}/token/{tokenid}"): Case(
        _plus(_victim_token, comment="changed")
    ),
    ("DELETE", "/access/users/{userid}/token/{tokenid}"): Case(_victim_token),
    ("GET", "/access/groups"): Case(_nothing),
    ("POST", "/access/groups"): Case(_named("groupid", "g")),
    ("GET", "/access/groups/{groupid}"): Case(_group),
    ("PUT", "/access/groups/{groupid}"): Case(_plus(_group, comment="changed")),
    ("DELETE", "/access/groups/{groupid}"): Case(_group),
    ("GET", "/access/roles"): Case(_nothing),
    ("POST", "/access/roles"): Case(_named("roleid", "R", privs="VM.Audit")),
    ("GET", "/access/roles/{roleid}"): Case(_role),
    ("PUT", "/access/roles/{roleid}"): Case(_plus(_role, privs="VM.Console")),
    ("DELETE", "/access/roles/{roleid}"): Case(_role),
    ("GET", "/access/acl"): Case(_nothing),
    ("PUT", "/access/acl"): Case(_acl),
    ("POST", "/access/domains"): Case(_new_realm),
    ("GET", "/access/domains/{realm}"): Case(_fixed(realm="pve")),
    ("PUT", "/access/domains/{realm}"): Case(_plus(_realm, comment="changed")),
    ("DELETE", "/access/domains/{realm}"): Case(_realm),
    ("GET", "/access/tfa"): Case(_nothing),
    ("GET", "/access/tfa/{userid}"): Case(_victim),
    ("POST", "/access/tfa/{userid}"): Case(_plus(_new_factor, password=PASSWORD)),
    ("GET", "/access/tfa/{userid}/{id}"): Case(_factor),
    ("DELETE", "/access/tfa/{userid}/{id}"): Case(_plus(_factor, password=PASSWORD)),
    ("PUT", "/access/tfa/{userid}/{id}"): Case(_plus(_factor, enable=0, password=PASSWORD)),
}
WORLD_OPEN = {e.key for e in SCHEMA.endpoints if e.permissions.user == "world"}


def test_every_endpoint_has_a_case():
    assert set(CASES) | WORLD_OPEN == set(SCHEMA.by_key)


def clause_grants(clause: Any, params: Params) -> list[tuple[str, list[str]]]:
    """The least grants that satisfy ``clause`` for a caller other than the target user."""
    test, *args = clause
    fill = lambda path: re.sub(r"\{([\w-]+)\}", lambda m: str(params[m[1]]), path)  # noqa: E731
    if test == "and":
        return [grant for sub in args for grant in clause_grants(sub, params)]
    if test == "or":
        branch = next(sub for sub in args if sub != ["userid-param", "self"])
        return clause_grants(branch, params)
    if test == "perm":
        path, privs, *options = args
        return [(fill(path), privs[:1] if "any" in options else list(privs))]
    if test == "perm-modify":
        return [(fill(args[0]), ["Permissions.Modify"])]
    if test == "userid-param":
        realm = str(params["userid"]).rpartition("@")[2]
        return [] if args[0] == "self" else [(f"/access/realm/{realm}", [args[0]])]
    if test == "userid-group":
        return [("/access/groups", list(args[0][:1]))]
    raise AssertionError(f"unknown clause {test}")


async def request(api: Api, endpoint: Endpoint, params: Params):
    path = re.sub(r"\{([\w-]+)\}", lambda m: str(params[m[1]]), endpoint.path)
    rest = {k: v for k, v in params.items() if f"{{{k}}}" not in endpoint.path}
    return await api.call(endpoint.method, path, **rest)


@pytest.fixture(scope="module")
def world(stack) -> World:
    """A guest, a task owned by the administrator with a log, and the node's capacity."""
    import asyncio

    async def build() -> World:
        async with connected(stack.nats_url, node=NODE, service="matrix") as bus:
            guest = await GuestRegistry(bus).register(
                guest_type=GuestType.QEMU, node=NODE, config={"name": "matrix"}, lock=None
            )
            upid = str(UpidMinter(NODE).mint("qmstart", str(guest.vmid), ADMIN))
            store = TaskStore(bus)
            parsed = upid.split(":")
            await store.create(
                TaskState(
                    upid=upid,
                    node=NODE,
                    pid=int(parsed[2], 16),
                    pstart=int(parsed[3], 16),
                    starttime=int(parsed[4], 16),
                    type="qmstart",
                    id=str(guest.vmid),
                    user=ADMIN,
                    worker="matrix.n1.none",
                )
            )
            await store.append_log(upid, TaskLogLine(n=1, t="starting", time=time.time()))
            capacity = NodeCapacity(
                node=NODE,
                arch=CpuArch.X86_64,
                cpu_model="test",
                cpus=4,
                sockets=1,
                memory_total=8 << 30,
                memory_used=1 << 30,
                time=time.time(),
            )
            await bus.publish(
                NODE_CAPACITY_PUBLISHED.to(node=NODE),
                CapacityPublished(
                    event_id=unique("e"), node=NODE, time=time.time(), capacity=capacity
                ),
            )
            return World(vmid=guest.vmid, upid=upid, dirs=stack.root / "dirs")

    return asyncio.run(build())


@pytest.fixture(scope="module", autouse=True)
def compute_agent(stack, world) -> None:
    """A compute agent on libvirt's test driver; started after the world, it adopts its guest."""
    import asyncio

    start_agent(stack, "test:///default")
    # A second node's agent: the target of the migration cases.
    start_agent(stack, "test:///default", RUCHER_NODE=PEER)

    async def wait() -> None:
        admin = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
        try:
            await wait_agent(admin)
        finally:
            await admin.close()

    asyncio.run(wait())


@pytest.fixture(scope="module", autouse=True)
def storage_service(stack, world) -> None:
    """The storage service of the node, its ``local`` storage in the stack's folder."""
    import asyncio

    start_storage(stack, stack.root / "local")

    async def wait() -> None:
        admin = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
        try:
            await wait_storage(admin)
        finally:
            await admin.close()

    asyncio.run(wait())


@pytest.fixture(scope="module", autouse=True)
def gpu_broker(stack, world) -> None:
    """The GPU broker of the node, on a synthetic host's sysfs tree."""
    import asyncio

    start_gpu(stack)

    async def wait() -> None:
        admin = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
        try:
            await wait_gpu(admin)
        finally:
            await admin.close()

    asyncio.run(wait())


@pytest.mark.parametrize("key", sorted(CASES), ids=lambda key: f"{key[0]} {key[1]}")
async def test_permission_matrix(key, stack, world, admin, anonymous):
    endpoint = SCHEMA.endpoint(*key)
    case = CASES[key]
    assert (await request(anonymous, endpoint, await case.prepare(admin, world))).status == 401

    nobody = await logged_in(stack, await make_user(admin, password=PASSWORD), PASSWORD)
    params = await case.prepare(admin, world)
    needed = needed_grants(endpoint, case, params)
    refused = await request(nobody, endpoint, params)
    await nobody.close()
    if not needed:
        assert refused.status == 200, refused
        return
    assert refused.status == 403, (refused, needed)

    holder = await make_user(admin, password=PASSWORD)
    params = await case.prepare(admin, world)
    needed = needed_grants(endpoint, case, params)
    for path, privs in needed:
        await grant(admin, path, privs, users=holder)
    allowed = await logged_in(stack, holder, PASSWORD)
    reply = await request(allowed, endpoint, params)
    await allowed.close()
    assert reply.status == case.expect, (reply, needed, params)


def needed_grants(endpoint: Endpoint, case: Case, params: Params) -> list[tuple[str, list[str]]]:
    """What the schema's clause asks for these parameters, plus the handler's own rules."""
    if not endpoint.permissions.check:
        return list(case.grants)
    return clause_grants(endpoint.permissions.check, params) + case.grants


@pytest.mark.parametrize("key", sorted(WORLD_OPEN), ids=lambda key: f"{key[0]} {key[1]}")
async def test_world_open_endpoints_answer_anonymous_callers(key, anonymous):
    endpoint = SCHEMA.endpoint(*key)
    params = {
        ("POST", "/access/ticket"): {"username": ADMIN, "password": "admin-secret-pass"},
        ("POST", "/access/openid/auth-url"): {"realm": "nosuch", "redirect-url": "https://x/"},
        ("POST", "/access/openid/login"): {"code": "c", "state": "s", "redirect-url": "https://x/"},
    }.get(key, {})
    reply = await request(anonymous, endpoint, params)
    if key == ("POST", "/access/openid/auth-url"):
        # Reached the IAM service without credentials: refused for the realm, not the caller.
        assert reply.status in {400, 404}, reply
    elif key == ("POST", "/access/openid/login"):
        # An unknown login state is a failed login, which IAM answers 401 like a bad password.
        assert reply.status == 401, reply
    else:
        assert reply.status == 200, reply
