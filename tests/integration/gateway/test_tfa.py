"""Second factors over HTTPS: a disabled TOTP entry is neither asked for nor accepted at login."""

from __future__ import annotations

import time

import pytest

from rucher.pve import totp

from .stack import ADMIN_PASSWORD, Api, Stack, logged_in, make_user, token_client

pytestmark = pytest.mark.integration

PASSWORD = "tfa-user-pass-1"


async def _challenge(stack: Stack, userid: str) -> str:
    """Log in with the password alone; return the TFA challenge ticket it must answer."""
    api = Api(stack)
    reply = await api.login(userid, PASSWORD)
    await api.close()
    assert reply.status == 200, reply
    assert reply.data["NeedTFA"] == 1, reply
    return reply.data["ticket"]


async def _answer(stack: Stack, userid: str, challenge: str, code: str) -> int:
    """Answer a TFA challenge as the Proxmox GUI does; the HTTP status."""
    api = Api(stack)
    reply = await api.post(
        "/access/ticket", username=userid, password=f"totp:{code}", **{"tfa-challenge": challenge}
    )
    await api.close()
    return reply.status


async def test_a_disabled_totp_factor_is_no_longer_required_nor_accepted(stack, admin):
    userid = await make_user(admin, password=PASSWORD)
    user = await logged_in(stack, userid, PASSWORD)
    spec = totp.TotpSpec(secret=totp.new_secret())
    added = await user.post(
        f"/access/tfa/{userid}",
        type="totp",
        totp=totp.make_uri(spec, userid),
        value=totp.code_now(spec, time.time()),
        description="phone",
        password=PASSWORD,
    )
    assert added.status == 200, added
    factor = f"/access/tfa/{userid}/{added.data['id']}"
    step = int(time.time()) // 30
    assert (
        await _answer(stack, userid, await _challenge(stack, userid), totp.code_at(spec, step))
        == 200
    )
    pending = await _challenge(stack, userid)

    # As in Proxmox, everyone but root@pam confirms the change with their own password.
    missing = await user.put(factor, enable=0)
    assert missing.status == 400 and set(missing.errors) == {"password"}, missing
    wrong = await user.put(factor, enable=0, password="not-the-password")
    assert wrong.status == 400 and set(wrong.errors) == {"password"}, wrong
    disabled = await user.put(factor, enable=0, password=PASSWORD)
    assert disabled.status == 200, disabled
    shown = (await user.get(factor)).data
    assert (shown["enable"], shown["description"]) == (0, "phone")
    assert "tfa-types" not in (await admin.get(f"/access/users/{userid}")).data

    # The password alone is a full ticket now; a code of the disabled factor opens nothing,
    # not even the challenge issued before it was disabled.
    plain = Api(stack)
    granted = await plain.login(userid, PASSWORD)
    assert granted.status == 200 and "NeedTFA" not in granted.data, granted
    assert (await plain.get(f"/access/tfa/{userid}")).status == 200
    await plain.close()
    fresh = totp.code_at(spec, step + 1)
    assert await _answer(stack, userid, pending, fresh) == 401

    # The description changes alone; re-enabling brings the factor back at the next login.
    renamed = await user.put(factor, description="old phone", password=PASSWORD)
    assert renamed.status == 200, renamed
    shown = (await user.get(factor)).data
    assert (shown["enable"], shown["description"]) == (0, "old phone")
    assert (await user.put(factor, enable=1, password=PASSWORD)).status == 200
    assert (await admin.get(f"/access/users/{userid}")).data["tfa-types"] == "totp"
    assert await _answer(stack, userid, await _challenge(stack, userid), fresh) == 200

    unknown = await user.put(f"/access/tfa/{userid}/nosuch", enable=0, password=PASSWORD)
    assert unknown.status == 404 and set(unknown.errors) == {"id"}, unknown
    await user.close()


async def test_a_ticket_alone_cannot_add_or_remove_a_second_factor(stack, admin):
    # Regression: POST and DELETE skipped the re-authentication PUT does, so a stolen ticket
    # could enrol the thief's authenticator for its victim, or remove the victim's factor.
    userid = await make_user(admin, password=PASSWORD)
    user = await logged_in(stack, userid, PASSWORD)
    spec = totp.TotpSpec(secret=totp.new_secret())

    def factor(**extra: str) -> dict[str, str]:
        value = totp.code_now(spec, time.time())
        return {"type": "totp", "totp": totp.make_uri(spec, userid), "value": value, **extra}

    factors = f"/access/tfa/{userid}"
    for caller, extra in (
        (user, {}),
        (user, {"password": "not-the-password"}),
        (admin, {"password": PASSWORD}),  # the victim's password, not the administrator's
    ):
        reply = await caller.post(factors, **factor(**extra))
        assert reply.status == 400 and set(reply.errors) == {"password"}, reply
    assert (await user.get(factors)).data == []

    own = await user.post(factors, **factor(password=PASSWORD))
    assert own.status == 200, own
    managed = await admin.post(factors, **factor(password=ADMIN_PASSWORD))
    assert managed.status == 200, managed
    ids = [entry["id"] for entry in (await user.get(factors)).data]
    assert ids == [own.data["id"], managed.data["id"]]

    for caller, extra in ((user, {}), (admin, {}), (user, {"password": "not-the-password"})):
        reply = await caller.delete(f"{factors}/{own.data['id']}", **extra)
        assert reply.status == 400 and set(reply.errors) == {"password"}, reply
    assert [entry["id"] for entry in (await user.get(factors)).data] == ids

    removed = await user.delete(f"{factors}/{own.data['id']}", password=PASSWORD)
    assert removed.status == 200, removed
    removed = await admin.delete(f"{factors}/{managed.data['id']}", password=ADMIN_PASSWORD)
    assert removed.status == 200, removed
    assert (await user.get(factors)).data == []
    await user.close()


async def test_api_tokens_may_not_change_second_factors(stack, admin):
    userid = await make_user(admin, password=PASSWORD)
    created = await admin.post(f"/access/users/{userid}/token/ci", privsep=0)
    assert created.status == 200, created
    token = token_client(stack, created.data["full-tokenid"], created.data["value"])
    spec = totp.TotpSpec(secret=totp.new_secret())
    added = await token.post(
        f"/access/tfa/{userid}",
        type="totp",
        totp=totp.make_uri(spec, userid),
        value=totp.code_now(spec, time.time()),
        password=PASSWORD,
    )
    updated = await token.put(f"/access/tfa/{userid}/any", enable=0, password=PASSWORD)
    deleted = await token.delete(f"/access/tfa/{userid}/any", password=PASSWORD)
    await token.close()
    assert [added.status, updated.status, deleted.status] == [403, 403, 403], (added, deleted)
