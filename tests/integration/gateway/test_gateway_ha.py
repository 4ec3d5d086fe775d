"""``/cluster/ha`` through the real gateway: resources, rules, groups, status, maintenance."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rucher.guests import GuestRegistry
from rucher.haconfig import HaConfigStore
from rucher.proto.guest import GuestType
from rucher.proto.ha import CrmAction

from ..buses import connected
from .stack import ADMIN, ADMIN_PASSWORD, NODE, grant, logged_in, make_user

pytestmark = pytest.mark.integration

PASSWORD = "ha-user-pass-1"
SCRIPT = Path(__file__).resolve().parents[3] / "ops" / "ha-maintenance"


async def _guest(stack, guest_type: GuestType = GuestType.QEMU) -> int:
    async with connected(stack.nats_url, node=NODE, service="hatest") as bus:
        record = await GuestRegistry(bus).register(
            guest_type=guest_type, node=NODE, config={"name": "ha"}, lock=None
        )
        return record.vmid


async def test_resources_are_validated_like_proxmox(stack, admin):
    reply = await admin.post("/cluster/ha/resources", sid="foo:100")
    assert reply.status == 400 and "sid" in reply.errors, reply
    reply = await admin.post("/cluster/ha/resources", sid="vm:999999")
    assert reply.status == 400
    assert reply.errors["sid"] == "resource 'vm:999999' does not exist in cluster"
    vmid = await _guest(stack)
    reply = await admin.post("/cluster/ha/resources", sid=f"ct:{vmid}")
    assert reply.status == 400 and "sid" in reply.errors, reply
    reply = await admin.post("/cluster/ha/resources", sid=f"vm:{vmid}", state="bogus")
    assert reply.status == 400 and "state" in reply.errors, reply
    reply = await admin.post("/cluster/ha/resources", sid=str(vmid), group="nogroup")
    assert reply.status == 400 and "group" in reply.errors, reply


async def test_resource_lifecycle_with_digest(stack, admin):
    vmid = await _guest(stack)
    sid = f"vm:{vmid}"
    reply = await admin.post("/cluster/ha/resources", sid=str(vmid), max_restart=3, comment="db")
    assert reply.status == 200, reply
    again = await admin.post("/cluster/ha/resources", sid=sid)
    assert again.status == 409 and "already defined" in again.body["message"]

    listed = (await admin.get("/cluster/ha/resources", type="vm")).data
    entry = next(item for item in listed if item["sid"] == sid)
    assert entry["state"] == "started" and entry["max_restart"] == 3 and entry["comment"] == "db"
    assert (await admin.get("/cluster/ha/resources", type="ct")).data == [
        item for item in (await admin.get("/cluster/ha/resources")).data if item["type"] == "ct"
    ]
    current = (await admin.get(f"/cluster/ha/resources/{sid}")).data
    assert current["failback"] == 1

    stale = "0" * 40
    reply = await admin.put(f"/cluster/ha/resources/{sid}", state="stopped", digest=stale)
    assert reply.status == 409 and "detected modified configuration" in reply.body["message"]
    reply = await admin.put(
        f"/cluster/ha/resources/{sid}", state="stopped", delete="comment", digest=current["digest"]
    )
    assert reply.status == 200, reply
    changed = (await admin.get(f"/cluster/ha/resources/{sid}")).data
    assert changed["state"] == "stopped" and "comment" not in changed
    assert changed["digest"] != current["digest"]
    reply = await admin.put(f"/cluster/ha/resources/{sid}", delete="bogus")
    assert reply.status == 400 and "delete" in reply.errors

    assert (await admin.delete(f"/cluster/ha/resources/{sid}")).status == 200
    assert (await admin.get(f"/cluster/ha/resources/{sid}")).status == 404


async def test_rules_and_groups(stack, admin):
    sids = []
    for _ in range(2):
        vmid = await _guest(stack)
        assert (await admin.post("/cluster/ha/resources", sid=f"vm:{vmid}")).status == 200
        sids.append(f"vm:{vmid}")
    reply = await admin.post(
        "/cluster/ha/rules", rule="pin1", type="node-affinity", resources=sids[0], nodes="n1:2,n2"
    )
    assert reply.status == 200, reply
    reply = await admin.post(
        "/cluster/ha/rules",
        rule="apart1",
        type="resource-affinity",
        resources=sids[0],
        affinity="negative",
    )
    assert reply.status == 400 and "resources" in reply.errors, reply
    reply = await admin.post(
        "/cluster/ha/rules",
        rule="apart1",
        type="resource-affinity",
        resources=",".join(sids),
        affinity="negative",
    )
    assert reply.status == 200, reply
    reply = await admin.post(
        "/cluster/ha/rules", rule="ghost", type="node-affinity", resources="vm:999999", nodes="n1"
    )
    assert reply.status == 400 and "resources" in reply.errors
    pin = (await admin.get("/cluster/ha/rules/pin1")).data
    assert pin["nodes"] == "n1:2,n2" and pin["strict"] == 0
    mine = (await admin.get("/cluster/ha/rules", resource=sids[1])).data
    assert [rule["rule"] for rule in mine] == ["apart1"]
    reply = await admin.put(
        "/cluster/ha/rules/pin1", type="node-affinity", strict=1, digest=pin["digest"]
    )
    assert reply.status == 200, reply
    assert (await admin.get("/cluster/ha/rules/pin1")).data["strict"] == 1

    # Deleting a resource purges it from the rules; a rule left empty goes too.
    assert (await admin.delete(f"/cluster/ha/resources/{sids[0]}")).status == 200
    assert (await admin.get("/cluster/ha/rules/pin1")).status == 404
    assert (await admin.get("/cluster/ha/rules/apart1")).data["resources"] == sids[1]
    assert (await admin.delete("/cluster/ha/rules/apart1")).status == 200

    reply = await admin.post("/cluster/ha/groups", group="prefer1", nodes="n1:1", restricted=1)
    assert reply.status == 200, reply
    group = (await admin.get("/cluster/ha/groups/prefer1")).data
    assert group["restricted"] == 1 and group["nodes"] == "n1:1"
    reply = await admin.put(f"/cluster/ha/resources/{sids[1]}", group="prefer1")
    assert reply.status == 200, reply
    assert (await admin.delete("/cluster/ha/groups/prefer1")).status == 400
    assert (await admin.delete(f"/cluster/ha/resources/{sids[1]}")).status == 200
    assert (await admin.delete("/cluster/ha/groups/prefer1")).status == 200


async def test_migrate_queues_a_request_and_arming_and_maintenance_reach_the_store(stack, admin):
    vmid = await _guest(stack)
    sid = f"vm:{vmid}"
    assert (await admin.post("/cluster/ha/resources", sid=sid)).status == 200
    reply = await admin.post(f"/cluster/ha/resources/{sid}/migrate", node="nowhere")
    assert reply.status == 400 and "node" in reply.errors
    reply = await admin.post(f"/cluster/ha/resources/{sid}/relocate", node=NODE)
    assert reply.status == 200 and reply.data["requested-node"] == NODE, reply

    assert (await admin.post("/cluster/ha/status/disarm-ha")).status == 400
    assert (
        await admin.post("/cluster/ha/status/disarm-ha", **{"resource-mode": "freeze"})
    ).status == 200
    assert (await admin.post(f"/nodes/{NODE}/ha/maintenance", enable=1)).status == 200
    async with connected(stack.nats_url, node=NODE, service="hatest") as bus:
        store = HaConfigStore(bus)
        requests = [r for r in await store.requests() if r.sid == sid]
        assert [(r.action, r.target) for r in requests] == [(CrmAction.RELOCATE, NODE)]
        control = (await store.control()).value
        assert not control.armed and control.maintenance == (NODE,)
    current = (await admin.get("/cluster/ha/status/current")).data
    fencing = next(item for item in current if item["type"] == "fencing")
    assert fencing["armed-state"] == "disarmed" and fencing["resource-mode"] == "freeze"
    lrm = next(item for item in current if item["id"] == f"lrm:{NODE}")
    assert "maintenance" in lrm["status"]
    assert any(item.get("sid") == sid for item in current)
    status = (await admin.get("/cluster/ha/status/manager_status")).data
    assert status["control"]["armed"] is False

    assert (await admin.post("/cluster/ha/status/arm-ha")).status == 200
    assert (await admin.post(f"/nodes/{NODE}/ha/maintenance", enable=0)).status == 200
    status = (await admin.get("/cluster/ha/status/manager_status")).data
    assert status["control"]["armed"] is True and status["control"]["maintenance"] == []


async def test_the_maintenance_extension_needs_sys_console_on_root(stack, admin):
    userid = await make_user(admin, password=PASSWORD)
    user = await logged_in(stack, userid, PASSWORD)
    try:
        assert (await user.post(f"/nodes/{NODE}/ha/maintenance", enable=1)).status == 403
        assert (await user.get("/cluster/ha/resources")).status == 403
        await grant(admin, "/", ["Sys.Audit"], users=userid)
        assert (await user.get("/cluster/ha/resources")).status == 200
        assert (await user.post(f"/nodes/{NODE}/ha/maintenance", enable=1)).status == 403
        await grant(admin, "/", ["Sys.Console"], users=userid)
        assert (await user.post(f"/nodes/{NODE}/ha/maintenance", enable=0)).status == 200
    finally:
        await user.close()


def _script(stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUCHER_")} | env
    url = stack.url.removesuffix("/api2/json")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--url", url, "--insecure"],
        env=environ,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def test_ops_ha_maintenance_script(stack, admin):
    login = {"RUCHER_USER": ADMIN, "RUCHER_PASSWORD": ADMIN_PASSWORD}
    done = await asyncio.to_thread(_script, stack, "enable", NODE, **login)
    assert done.returncode == 0, done.stderr
    assert f"node {NODE}: maintenance enabled" in done.stdout
    status = (await admin.get("/cluster/ha/status/manager_status")).data
    assert status["control"]["maintenance"] == [NODE]
    done = await asyncio.to_thread(_script, stack, "disable", NODE, **login)
    assert done.returncode == 0, done.stderr
    status = (await admin.get("/cluster/ha/status/manager_status")).data
    assert status["control"]["maintenance"] == []
    refused = await asyncio.to_thread(_script, stack, "enable", "nosuchnode", **login)
    assert refused.returncode == 1 and "node" in refused.stderr
    anonymous = await asyncio.to_thread(_script, stack, "enable", NODE)
    assert anonymous.returncode != 0 and "RUCHER_API_TOKEN" in anonymous.stderr
