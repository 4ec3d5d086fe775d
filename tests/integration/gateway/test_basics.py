"""The gateway over HTTPS: TLS, the Proxmox envelope, authentication, OpenAPI, the access log."""

from __future__ import annotations

import json
import ssl
import stat
from pathlib import Path

import httpx
import pytest

from rucher.gateway.certs import ensure_self_signed

from .stack import (
    ADMIN,
    ADMIN_PASSWORD,
    Api,
    logged_in,
    make_user,
    start_stack,
    token_client,
    unique,
)

pytestmark = pytest.mark.integration


def test_tls_on_a_certificate_made_at_first_start(stack):
    cert = stack.root / "gateway" / "gateway" / "pve-ssl.pem"
    key = stack.root / "gateway" / "gateway" / "pve-ssl.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    served = ssl.get_server_certificate(("127.0.0.1", stack.port))
    assert served.strip() == cert.read_text().strip()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{stack.port}/api2/json/version", timeout=2)


async def test_version_speaks_proxmox_9_1_and_names_rucher(admin):
    reply = await admin.get("/version")
    assert reply.status == 200
    assert reply.data["release"] == "9.1"
    assert reply.data["version"].startswith("9.1.")
    assert reply.data["product"] == "rucher" and reply.data["product-version"]
    assert len(reply.data["repoid"]) >= 8


async def test_anything_else_is_not_implemented_in_proxmox_words(admin):
    reply = await admin.get("/nodes/n1/bogus")
    assert reply.status == 501
    assert reply.body == {
        "data": None,
        "message": "Method 'GET /api2/json/nodes/n1/bogus' not implemented",
    }


async def test_only_world_open_endpoints_answer_without_credentials(anonymous):
    assert (await anonymous.get("/access/domains")).status == 200
    assert (await anonymous.get("/access/ticket")).body == {"data": None}
    for path in ("/version", "/nodes", "/cluster/resources", "/access/users", "/cluster/tasks"):
        reply = await anonymous.get(path)
        assert (reply.status, reply.body) == (401, {"data": None}), path


async def test_a_wrong_password_is_401_with_null_data(anonymous):
    reply = await anonymous.post("/access/ticket", username=ADMIN, password="wrong")
    assert (reply.status, reply.body) == (401, {"data": None})
    reply = await anonymous.post("/access/ticket", username="nobody@pve", password="wrong")
    assert (reply.status, reply.body) == (401, {"data": None})


async def test_a_ticket_renews_by_posting_it_as_the_password(stack, admin, anonymous):
    ticket = admin.client.cookies["PVEAuthCookie"]
    reply = await anonymous.post("/access/ticket", username=ADMIN, password=ticket)
    assert reply.status == 200 and reply.data["username"] == ADMIN
    assert reply.data["ticket"].startswith("PVE:admin@pve:")
    renewed = Api(stack)
    renewed.client.cookies.set("PVEAuthCookie", reply.data["ticket"])
    assert (await renewed.get("/version")).status == 200
    await renewed.close()


async def test_changes_with_a_ticket_need_the_csrf_token(stack, admin):
    bare = Api(stack)
    bare.client.cookies.set("PVEAuthCookie", admin.client.cookies["PVEAuthCookie"])
    assert (await bare.get("/access/groups")).status == 200
    group = unique("g")
    assert (await bare.post("/access/groups", groupid=group)).status == 401
    bare.client.headers["CSRFPreventionToken"] = "1:forged"
    assert (await bare.post("/access/groups", groupid=group)).status == 401
    assert (await admin.get(f"/access/groups/{group}")).status == 404
    await bare.close()


async def test_tampered_tickets_and_tokens_are_refused(stack, admin):
    ticket = admin.client.cookies["PVEAuthCookie"]
    forged = Api(stack)
    forged.client.cookies.set("PVEAuthCookie", ticket.replace("admin@pve", "root@pam"))
    assert (await forged.get("/version")).status == 401
    token = token_client(stack, "admin@pve!nope", "00000000-0000-0000-0000-000000000000")
    assert (await token.get("/version")).status == 401
    await forged.close()
    await token.close()


async def test_api_tokens_authenticate_without_csrf_but_not_where_proxmox_forbids(stack, admin):
    userid = await make_user(admin)
    created = await admin.post(f"/access/users/{userid}/token/ci", privsep=0)
    assert created.status == 200
    assert created.data["full-tokenid"] == f"{userid}!ci"
    token = token_client(stack, created.data["full-tokenid"], created.data["value"])
    assert (await token.get("/version")).status == 200
    # PUT /access/password does not allow tokens (allowtoken 0 in the Proxmox schema).
    reply = await token.put("/access/password", userid=userid, password="another-pass-1")
    assert reply.status == 403
    await token.close()


async def test_a_password_change_is_confirmed_with_the_callers_own_password(stack, admin):
    userid = await make_user(admin, password="first-pass-1")
    user = await logged_in(stack, userid, "first-pass-1")
    for confirmation in ({}, {"confirmation-password": "not-the-password"}):
        reply = await user.put(
            "/access/password", userid=userid, password="second-pass-1", **confirmation
        )
        assert reply.status == 400 and set(reply.errors) == {"confirmation-password"}, reply
    reply = await user.put(
        "/access/password",
        userid=userid,
        password="second-pass-1",
        **{"confirmation-password": "first-pass-1"},
    )
    assert reply.status == 200, reply
    await user.close()
    # An administrator confirms with their own password, not the user's.
    reply = await admin.put(
        "/access/password",
        userid=userid,
        password="third-pass-1",
        **{"confirmation-password": ADMIN_PASSWORD},
    )
    assert reply.status == 200, reply
    fresh = Api(stack)
    assert (await fresh.login(userid, "second-pass-1")).status == 401
    assert (await fresh.login(userid, "third-pass-1")).status == 200
    await fresh.close()


async def test_errors_name_the_field(admin):
    reply = await admin.get("/cluster/resources", type="vms")
    assert reply.status == 400
    assert reply.body["message"] == "Parameter verification failed."
    assert set(reply.errors) == {"type"}


async def test_json_bodies_are_accepted_like_forms(stack, admin):
    group = unique("g")
    response = await admin.client.post("/access/groups", json={"groupid": group, "comment": "j"})
    assert response.status_code == 200, response.text
    assert (await admin.get(f"/access/groups/{group}")).data["comment"] == "j"


async def test_the_openapi_document_lists_every_endpoint(stack, anonymous):
    response = await anonymous.client.get(f"https://127.0.0.1:{stack.port}/api2/openapi.json")
    document = response.json()
    assert document["openapi"].startswith("3.")
    operations = {
        (method.upper(), path.removeprefix("/api2/json"))
        for path, item in document["paths"].items()
        for method in item
    }
    assert ("GET", "/cluster/resources") in operations
    assert ("POST", "/access/users/{userid}/token/{tokenid}") in operations
    ticket = document["paths"]["/api2/json/access/ticket"]["post"]
    assert ticket["security"] == []
    assert (
        "username"
        in ticket["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"][
            "required"
        ]
    )


async def test_each_request_is_logged_with_user_path_status_and_duration(stack, admin):
    group = unique("missing")
    await admin.get(f"/access/groups/{group}")
    lines = [json.loads(line) for line in (stack.root / "gateway.log").read_text().splitlines()]
    entry = next(line for line in lines if line.get("path", "").endswith(group))
    assert entry["event"] == "http_request"
    assert (entry["user"], entry["method"], entry["status"]) == ("admin@pve", "GET", 404)
    assert entry["ms"] > 0


async def test_a_second_login_as_another_user(stack, admin):
    userid = await make_user(admin, password="second-pass-1")
    other = await logged_in(stack, userid, "second-pass-1")
    assert (await other.get("/access/permissions")).data == {}
    await other.close()


def test_idle_memory_stays_under_80_mib(stack):
    gateway = next(process for process in stack.processes if process.name == "gateway")
    status = Path(f"/proc/{gateway.pid}/status").read_text()
    rss_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
    )
    assert rss_kib / 1024 < 80, f"gateway RSS {rss_kib / 1024:.1f} MiB"


def test_a_supplied_certificate_replaces_the_generated_one(nats_server, tmp_path):
    cert, key = tmp_path / "mine.pem", tmp_path / "mine.key"
    ensure_self_signed(cert, key, node="supplied")
    own = start_stack(
        nats_server.url,
        tmp_path / "own",
        RUCHER_GATEWAY_CERT=str(cert),
        RUCHER_GATEWAY_KEY=str(key),
    )
    try:
        served = ssl.get_server_certificate(("127.0.0.1", own.port))
        assert served.strip() == cert.read_text().strip()
        assert not (tmp_path / "own" / "gateway" / "gateway").exists()
    finally:
        own.stop()
