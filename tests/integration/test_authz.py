"""AuthzView against real NATS: invalidation timing, key rotation, bootstrap settings."""

from __future__ import annotations

import asyncio
import time

import pytest

from rucher.authz import AuthzView
from rucher.bus import KV, RucherError
from rucher.iam.keys import ensure_keys, rotate_if_due
from rucher.proto import iam
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import (
    TICKET_KEYS_KEY,
    AclRecord,
    AclSubjectType,
    TicketKeys,
    UserRecord,
    acl_key,
    user_key,
)
from rucher.proto.streams import IAM
from rucher.pve.ticket import make_csrf_token, make_ticket

from .buses import connected, until
from .iam_service import start_iam, stop_iam, wait_ready

pytestmark = pytest.mark.integration


async def test_an_acl_change_reaches_every_view_within_a_second(nats_cluster):
    urls = [server.url for server in nats_cluster.servers]
    async with (
        connected(urls[0], service="writer") as writer,
        connected(urls[1], service="g1") as g1,
        connected(urls[2], service="g2") as g2,
    ):
        users: KV[UserRecord] = KV(writer, IAM, UserRecord)
        acl: KV[AclRecord] = KV(writer, IAM, AclRecord)
        await users.put(user_key("alice@pve"), UserRecord(userid="alice@pve"))
        views = [AuthzView(g1), AuthzView(g2)]
        for view in views:
            await view.start()
        try:
            for view in views:
                assert not view.allowed("alice@pve", "/vms/100", ["VM.PowerMgmt"])
            delays = []
            for round_ in range(5):
                grant = AclRecord(
                    path=f"/vms/{100 + round_}",
                    ugid="alice@pve",
                    type=AclSubjectType.USER,
                    roleid="PVEVMUser",
                )
                path = grant.path
                began = time.monotonic()
                await acl.put(acl_key(grant), grant)
                for view in views:
                    await until(lambda v=view, p=path: v.allowed("alice@pve", p, ["VM.PowerMgmt"]))
                delays.append(time.monotonic() - began)
                await acl.delete(acl_key(grant))
                for view in views:
                    await until(
                        lambda v=view, p=path: not v.allowed("alice@pve", p, ["VM.PowerMgmt"])
                    )
            assert max(delays) < 1.0, delays
            # Disabling the user takes everything away just as fast.
            await users.put(user_key("alice@pve"), UserRecord(userid="alice@pve", enable=False))
            began = time.monotonic()
            await until(lambda: not views[0].index.active("alice@pve"))
            assert time.monotonic() - began < 1.0
        finally:
            for view in views:
                await view.stop()


async def test_tickets_survive_a_key_rotation_once(nats_server):
    async with connected(nats_server.url) as bus:
        keys: KV[TicketKeys] = KV(bus, IAM, TicketKeys)
        users: KV[UserRecord] = KV(bus, IAM, UserRecord)
        await users.put(user_key("bob@pve"), UserRecord(userid="bob@pve"))
        first = await ensure_keys(keys)
        assert await ensure_keys(keys) == first  # created once
        view = AuthzView(bus)
        await view.start()
        try:
            now = time.time()
            ticket = make_ticket(first.current, "bob@pve", now)
            csrf = make_csrf_token(first.current, "bob@pve", now)
            assert view.verify_ticket(ticket) == "bob@pve"
            assert not await rotate_if_due(keys, every=3600)  # not due yet
            assert await rotate_if_due(keys, every=3600, now=now + 3600)
            await until(lambda: view.ticket_keys is not None and view.ticket_keys != first)
            assert view.ticket_keys.previous == first.current
            assert view.verify_ticket(ticket) == "bob@pve"  # signed with the previous key
            view.verify_csrf("bob@pve", csrf)
            assert await rotate_if_due(keys, every=3600, now=now + 7200)
            await until(lambda: view.ticket_keys.previous != first.current)
            with pytest.raises(RucherError) as refused:
                view.verify_ticket(ticket)
            assert refused.value.code is ErrorCode.UNAUTHENTICATED
            stored = await keys.get(TICKET_KEYS_KEY)
            assert stored is not None and stored.value == view.ticket_keys
        finally:
            await view.stop()


@pytest.mark.slow
async def test_default_failure_delay_and_a_preset_admin_password(nats_server, tmp_path):
    process = start_iam(nats_server.url, tmp_path / "state", RUCHER_ADMIN_PASSWORD="preset-pass-1")
    try:
        await wait_ready(nats_server.url, process)
        assert not (tmp_path / "state" / "admin-password").exists()
        async with connected(nats_server.url) as bus:
            login = iam.Login(command_id="1", username="admin@pve", password="preset-pass-1")
            granted = await bus.request(iam.LOGIN.address, login, timeout=30)
            assert granted.username == "admin@pve"
            timings = []
            for username in ("admin@pve", "nobody@pve"):
                wrong = iam.Login(command_id="2", username=username, password="wrong-password")
                began = time.monotonic()
                with pytest.raises(RucherError) as refused:
                    await bus.request(iam.LOGIN.address, wrong, timeout=30)
                timings.append(time.monotonic() - began)
                assert refused.value.code is ErrorCode.UNAUTHENTICATED
            assert all(1.9 <= t <= 3.2 for t in timings), timings
    finally:
        await asyncio.to_thread(stop_iam, process)
