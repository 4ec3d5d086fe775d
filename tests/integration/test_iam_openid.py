"""The openid realm against a real OpenID Connect provider (npm oidc-provider), both layouts.

The provider runs as a Node.js process with its development login form; the test plays the
browser (following redirects, posting the login and consent forms) while the IAM service does
the rest: discovery, PKCE, the code exchange, ID token verification, userinfo, user and group
provisioning. With the Keycloak layout the service goes through python-keycloak.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from rucher.authz import AuthzView
from rucher.bus import RucherError
from rucher.iam.realms.openid import is_keycloak_issuer
from rucher.proto import iam
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import RealmRecord, RealmType

from .buses import connected
from .iam_service import ROOT, start_iam, stop_iam, wait_ready

pytestmark = pytest.mark.integration

PROVIDER = ROOT / "ops" / "oidc-provider"
REDIRECT = "https://gateway.test:8006/openid-callback"
SECRET = "rucher-test-secret"


def _node_unavailable() -> str | None:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def provider_factory(tmp_path):
    """Start the provider: ``start(layout) -> issuer``; every one is stopped afterwards."""
    reason = _node_unavailable()
    if reason:
        pytest.skip(f"OpenID provider unavailable: {reason}")
    subprocess.run([str(ROOT / "ops" / "install-oidc-provider")], check=True, timeout=300)
    started: list[subprocess.Popen[str]] = []

    def start(layout: str) -> str:
        log = (tmp_path / f"oidc-{layout}.log").open("w")
        process = subprocess.Popen(
            ["node", "provider.mjs", "--layout", layout, "--redirect-uri", REDIRECT],
            cwd=PROVIDER,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("READY "), f"provider did not start: {line!r}"
        return line.split()[1]

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


async def play_browser(auth_url: str, login: str) -> dict[str, str]:
    """Follow the provider's redirects and forms as a browser would; the callback's query."""
    async with httpx.AsyncClient(follow_redirects=False, timeout=10) as browser:
        url, method, form = auth_url, "GET", None
        for _ in range(12):
            response = await browser.request(method, url, data=form)
            if response.is_redirect:
                target = urljoin(url, response.headers["location"])
                if target.startswith(REDIRECT):
                    return {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
                url, method, form = target, "GET", None
                continue
            assert response.status_code == 200, (response.status_code, response.text[:500])
            prompt = re.search(r'name="prompt" value="(\w+)"', response.text)
            assert prompt, response.text[:500]
            form = {"prompt": prompt.group(1)}
            if prompt.group(1) == "login":
                form |= {"login": login, "password": "any"}
            method = "POST"
        raise AssertionError("the provider never redirected back")


async def request(bus, subject, message):
    return await bus.request(subject.address, message, timeout=30)


@pytest.mark.parametrize("layout", ["default", "keycloak"])
async def test_openid_login_with_pkce(layout, provider_factory, nats_server, tmp_path):
    issuer = provider_factory(layout)
    assert is_keycloak_issuer(issuer) == (layout == "keycloak")
    realm = f"corp{layout[:3]}"
    claim = "groups" if layout == "default" else "realm_access.roles"
    process = start_iam(nats_server.url, tmp_path / "state", RUCHER_LOGIN_FAILURE_DELAY="0.2")
    try:
        await wait_ready(nats_server.url, process)
        async with connected(nats_server.url) as bus:
            config = RealmRecord(
                realm=realm,
                type=RealmType.OPENID,
                issuer_url=issuer,
                client_id="rucher",
                client_key=SECRET,
                autocreate=True,
                username_claim="preferred_username" if layout == "keycloak" else "",
                scopes="email profile groups",
                groups_claim=claim,
                groups_autocreate=True,
            )
            await request(
                bus,
                iam.DOMAIN_CREATE,
                iam.DomainCreate(command_id="1", actor="root@pam", config=config),
            )

            async def start_login() -> tuple[str, dict[str, str]]:
                issued = await request(
                    bus,
                    iam.OPENID_AUTH_URL,
                    iam.OpenIdAuthUrl(
                        command_id=uuid.uuid4().hex, realm=realm, redirect_url=REDIRECT
                    ),
                )
                query = {k: v[0] for k, v in parse_qs(urlsplit(issued.url).query).items()}
                return issued.url, query

            url, query = await start_login()
            expected_path = (
                "/realms/rucher/protocol/openid-connect/auth" if layout == "keycloak" else "/auth"
            )
            assert urlsplit(url).path == expected_path
            assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
            assert query["redirect_uri"] == REDIRECT and "openid" in query["scope"].split()
            callback = await play_browser(url, "alice")
            assert callback["state"] == query["state"] and "code" in callback

            began = time.monotonic()
            granted = await request(
                bus,
                iam.OPENID_LOGIN,
                iam.OpenIdLogin(
                    command_id="2",
                    code=callback["code"],
                    state=callback["state"],
                    redirect_url=REDIRECT,
                    source="198.51.100.7",
                ),
            )
            assert time.monotonic() - began < 5
            userid = f"alice@{realm}"
            assert granted.username == userid
            view = AuthzView(bus)
            await view.start()
            try:
                assert view.verify_ticket(granted.ticket) == userid
                view.verify_csrf(userid, granted.csrf_token)
            finally:
                await view.stop()
            users = {
                u.userid: u for u in (await request(bus, iam.USER_LIST, iam.UserListQuery())).users
            }
            wanted = (
                {f"admins-{realm}", f"dev_ops-{realm}"}
                if layout == "default"
                else {f"auditor-{realm}", f"operator-{realm}"}
            )
            assert set(users[userid].groups) == wanted
            assert users[userid].email == "alice@example.com"
            groups = {
                g.groupid for g in (await request(bus, iam.GROUP_LIST, iam.GroupListQuery())).groups
            }
            assert wanted <= groups

            # A state is good once; a forged code is refused; the redirect URL must match.
            with pytest.raises(RucherError) as replay:
                await request(
                    bus,
                    iam.OPENID_LOGIN,
                    iam.OpenIdLogin(
                        command_id="3",
                        code=callback["code"],
                        state=callback["state"],
                        redirect_url=REDIRECT,
                    ),
                )
            assert replay.value.code is ErrorCode.UNAUTHENTICATED
            _, fresh = await start_login()
            with pytest.raises(RucherError) as forged:
                await request(
                    bus,
                    iam.OPENID_LOGIN,
                    iam.OpenIdLogin(
                        command_id="4",
                        code="forged-code",
                        state=fresh["state"],
                        redirect_url=REDIRECT,
                    ),
                )
            assert forged.value.code is ErrorCode.UNAUTHENTICATED
            _, other = await start_login()
            with pytest.raises(RucherError) as moved:
                await request(
                    bus,
                    iam.OPENID_LOGIN,
                    iam.OpenIdLogin(
                        command_id="5",
                        code="x",
                        state=other["state"],
                        redirect_url="https://evil.test/cb",
                    ),
                )
            assert moved.value.code is ErrorCode.INVALID
            assert moved.value.details == {"field": "redirect-url"}
    finally:
        await asyncio.to_thread(stop_iam, process)


def test_the_provider_is_pinned():
    package = (PROVIDER / "package.json").read_text()
    assert '"oidc-provider": "9.' in package
    assert Path(PROVIDER / ".gitignore").read_text().strip() == "node_modules/"
