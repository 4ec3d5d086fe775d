"""The pam realm against the machine's real PAM stack and a system user made for the test."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid

import pytest

from rucher.authz import AuthzView
from rucher.bus import RucherError
from rucher.proto import iam
from rucher.proto.errors import ErrorCode
from rucher.pve import totp

from .buses import connected
from .iam_service import start_iam, stop_iam, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture
def system_user():
    """A throwaway Linux user with a known password, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a system user for PAM needs root")
    if shutil.which("useradd") is None or shutil.which("chpasswd") is None:
        pytest.skip("useradd/chpasswd are not installed")
    name = f"rt{uuid.uuid4().hex[:8]}"
    password = f"Pam-{uuid.uuid4().hex[:12]}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
    )
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True)
        yield name, password
    finally:
        subprocess.run(["userdel", name], check=False)


async def test_a_pam_user_logs_in_with_the_system_password(nats_server, tmp_path, system_user):
    name, password = system_user
    process = start_iam(nats_server.url, tmp_path / "state", RUCHER_LOGIN_FAILURE_DELAY="0.2")
    try:
        await wait_ready(nats_server.url, process)
        async with connected(nats_server.url) as bus:
            userid = f"{name}@pam"
            # Known to the system but not to Rucher yet: refused.
            with pytest.raises(RucherError) as unknown:
                await bus.request(
                    iam.LOGIN.address,
                    iam.Login(command_id="0", username=userid, password=password),
                    timeout=30,
                )
            assert unknown.value.code is ErrorCode.UNAUTHENTICATED
            create = iam.UserCreate(command_id="1", actor="root@pam", userid=userid)
            await bus.request(iam.USER_CREATE.address, create, timeout=30)
            login = iam.Login(command_id="2", username=name, password=password, realm="pam")
            granted = await bus.request(iam.LOGIN.address, login, timeout=30)
            view = AuthzView(bus)
            await view.start()
            try:
                assert view.verify_ticket(granted.ticket) == userid
            finally:
                await view.stop()
            for wrong in (password + "x", "", "a\x00b"):
                bad = iam.Login(command_id="3", username=userid, password=wrong)
                with pytest.raises(RucherError) as refused:
                    await bus.request(iam.LOGIN.address, bad, timeout=30)
                assert refused.value.code is ErrorCode.UNAUTHENTICATED
    finally:
        await asyncio.to_thread(stop_iam, process)


async def test_a_pam_user_confirms_changes_with_the_system_password(
    nats_server, tmp_path, system_user
):
    # Regression: PUT /access/password checked `confirmation-password` against pve hashes only,
    # so a pam user (an administrator logged in as a system user) could never confirm one.
    name, password = system_user
    process = start_iam(nats_server.url, tmp_path / "state", RUCHER_LOGIN_FAILURE_DELAY="0.2")
    try:
        await wait_ready(nats_server.url, process)
        async with connected(nats_server.url) as bus:

            async def ask(subject, **fields):
                if "command_id" in subject.payload.__struct_fields__:
                    fields["command_id"] = uuid.uuid4().hex
                message = subject.payload(**fields)
                return await bus.request(subject.address, message, timeout=30)

            async def refused(field, subject, **fields):
                with pytest.raises(RucherError) as caught:
                    await ask(subject, **fields)
                assert caught.value.code is ErrorCode.INVALID, caught.value
                assert caught.value.details.get("field") == field, caught.value.details

            actor = f"{name}@pam"
            target = f"pt{uuid.uuid4().hex[:8]}@pve"
            await ask(iam.USER_CREATE, actor="root@pam", userid=actor)
            await ask(iam.USER_CREATE, actor="root@pam", userid=target, password="first-pass-1")
            change = {"actor": actor, "userid": target, "password": "second-pass-1"}
            field = "confirmation-password"
            await refused(field, iam.PASSWORD_CHANGE, **change)
            await refused(
                field, iam.PASSWORD_CHANGE, confirmation_password=password + "x", **change
            )
            await ask(iam.PASSWORD_CHANGE, confirmation_password=password, **change)
            granted = await ask(iam.LOGIN, username=target, password="second-pass-1")
            assert granted.username == target

            # The same check guards second factors: PAM confirms them too.
            spec = totp.TotpSpec(secret=totp.new_secret())
            factor = {"actor": actor, "userid": actor, "totp": totp.make_uri(spec, actor)}
            code = totp.code_now(spec, time.time())
            await refused("password", iam.TFA_ADD, value=code, password=password + "x", **factor)
            added = await ask(iam.TFA_ADD, value=code, password=password, **factor)
            removal = {"actor": actor, "userid": actor, "id": added.id}
            await refused("password", iam.TFA_DELETE, **removal)
            await ask(iam.TFA_DELETE, password=password, **removal)
            assert (await ask(iam.TFA_LIST, userid=actor)).entries == ()
    finally:
        await asyncio.to_thread(stop_iam, process)
