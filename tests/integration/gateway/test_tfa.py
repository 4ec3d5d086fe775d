"""Second factors over HTTPS: a disabled TOTP entry is neither asked for nor accepted at login."""

from __future__ import annotations

import time

import pytest

from rucher.pve import totp

from .stack import Api, Stack, logged_in, make_user, token_client

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


async def test_api_tokens_may_not_change_second_factors(stack, admin):
    userid = await make_user(admin, password=PASSWORD)
    created = await admin.post(f"/access/users/{userid}/token/ci", privsep=0)
    assert created.status == 200, created
    token = token_client(stack, created.data["full-tokenid"], created.data["value"])
    reply = await token.put(f"/access/tfa/{userid}/any", enable=0, password=PASSWORD)
    await token.close()
    assert reply.status == 403, reply
