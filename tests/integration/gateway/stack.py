"""The real IAM service and gateway, as processes, on a real nats-server; and an API client.

The gateway's integration tests talk HTTPS to ``python -m rucher.gateway`` exactly as clients
do; the IAM service (``python -m rucher.iam``) answers its ``rpc.iam.*`` requests and bootstraps
``admin@pve`` with a known password.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rucher.testing.nats import free_port
from rucher.testing.process import ManagedProcess

ADMIN = "admin@pve"
ADMIN_PASSWORD = "admin-secret-pass"
NODE = "n1"
READY_TIMEOUT = 60.0

_names = itertools.count(1)


def unique(prefix: str) -> str:
    """A name no other test of the session uses."""
    return f"{prefix}{next(_names)}{uuid.uuid4().hex[:4]}"


@dataclass
class Stack:
    """The processes of one stack and where the API is."""

    nats_url: str
    root: Path
    port: int
    processes: list[ManagedProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The API's base URL."""
        return f"https://127.0.0.1:{self.port}/api2/json"

    def logs(self) -> str:
        """The end of every process's log, for a failed test's report."""
        return "\n".join(f"--- {p.name}\n{p.tail_log(40)}" for p in self.processes)

    def stop(self) -> None:
        """Stop every process (gateway first)."""
        for process in reversed(self.processes):
            process.stop(timeout=15)


def service_env(nats_url: str, state: Path, **extra: str) -> dict[str, str]:
    """The environment of one service process of the test stack."""
    env = {
        "RUCHER_NATS_URL": nats_url,
        "RUCHER_NODE": NODE,
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_LOG_FORMAT": "json",
        "RUCHER_REGISTRY_TTL": "10",
        "RUCHER_SHUTDOWN_GRACE": "3",
    }
    env.update(extra)
    # Variables of a developer's own stack must not leak into the test's processes.
    for name in list(os.environ):
        if name.startswith("RUCHER_") and name not in env:
            env[name] = ""
    return env


def start_stack(nats_url: str, root: Path, **gateway_env: str) -> Stack:
    """Start IAM and the gateway and return once the gateway answers a world-open endpoint."""
    stack = Stack(nats_url=nats_url, root=root, port=free_port())
    iam = ManagedProcess(
        "iam",
        [sys.executable, "-m", "rucher.iam"],
        root / "iam.log",
        service_env(
            nats_url,
            root / "iam",
            RUCHER_ADMIN_PASSWORD=ADMIN_PASSWORD,
            RUCHER_LOGIN_FAILURE_DELAY="0.05",
            RUCHER_LOGIN_THROTTLE_AFTER="1000",
        ),
    )
    gateway = ManagedProcess(
        "gateway",
        [sys.executable, "-m", "rucher.gateway"],
        root / "gateway.log",
        service_env(
            nats_url,
            root / "gateway",
            RUCHER_GATEWAY_LISTEN=f"127.0.0.1:{stack.port}",
            **gateway_env,
        ),
    )
    stack.processes += [iam, gateway]
    iam.start()
    gateway.start()
    try:
        wait_ready(stack)
    except BaseException:
        stack.stop()
        raise
    return stack


def wait_ready(stack: Stack) -> None:
    """Poll ``GET /access/domains`` until it answers 200 (IAM and gateway both up)."""
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx.Client(verify=False, timeout=2) as client:
        while True:
            for process in stack.processes:
                if not process.alive:
                    raise RuntimeError(f"{process.name} exited:\n{stack.logs()}")
            try:
                if client.get(f"{stack.url}/access/domains").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not come up:\n{stack.logs()}")
            time.sleep(0.1)


@dataclass
class Reply:
    """An API answer: HTTP status and decoded body."""

    status: int
    body: dict[str, Any]

    @property
    def data(self) -> Any:
        """The ``data`` member."""
        return self.body.get("data")

    @property
    def errors(self) -> dict[str, str]:
        """Parameter errors of a 400."""
        return self.body.get("errors") or {}


class Api:
    """An HTTPS client of the gateway, anonymous, with a ticket, or with an API token."""

    def __init__(self, stack: Stack, *, headers: dict[str, str] | None = None) -> None:
        self.stack = stack
        self.client = httpx.AsyncClient(
            base_url=stack.url, verify=False, timeout=30, headers=headers or {}
        )

    async def close(self) -> None:
        """Close the connection."""
        await self.client.aclose()

    async def call(self, method: str, url: str, /, **params: Any) -> Reply:
        """One request: parameters in the query for GET/DELETE, form-encoded otherwise."""
        values = {key: value for key, value in params.items() if value is not None}
        # A (file name, bytes) value is a file: the body is then multipart, as for uploads.
        files = {key: value for key, value in values.items() if isinstance(value, tuple)}
        if method in {"GET", "DELETE"}:
            response = await self.client.request(method, url, params=values)
        elif files:
            data = {key: value for key, value in values.items() if key not in files}
            response = await self.client.request(method, url, data=data, files=files)
        else:
            response = await self.client.request(method, url, data=values)
        try:
            body = response.json()
        except ValueError:
            body = {"raw": response.text}
        return Reply(response.status_code, body)

    async def get(self, url: str, /, **params: Any) -> Reply:
        """GET."""
        return await self.call("GET", url, **params)

    async def post(self, url: str, /, **params: Any) -> Reply:
        """POST."""
        return await self.call("POST", url, **params)

    async def put(self, url: str, /, **params: Any) -> Reply:
        """PUT."""
        return await self.call("PUT", url, **params)

    async def delete(self, url: str, /, **params: Any) -> Reply:
        """DELETE."""
        return await self.call("DELETE", url, **params)

    async def login(self, username: str, password: str) -> Reply:
        """Log in; on success later requests carry the ticket cookie and CSRF token."""
        reply = await self.post("/access/ticket", username=username, password=password)
        if reply.status == 200:
            self.client.cookies.set("PVEAuthCookie", reply.data["ticket"])
            self.client.headers["CSRFPreventionToken"] = reply.data["CSRFPreventionToken"]
        return reply


async def logged_in(stack: Stack, username: str, password: str) -> Api:
    """A client logged in as ``username`` (fails the test if the login fails)."""
    api = Api(stack)
    reply = await api.login(username, password)
    assert reply.status == 200, (reply, stack.logs())
    return api


def token_client(stack: Stack, tokenid: str, secret: str) -> Api:
    """A client authenticating every request with an API token."""
    return Api(stack, headers={"Authorization": f"PVEAPIToken={tokenid}={secret}"})


async def make_user(
    admin: Api, *, grants: list[tuple[str, list[str]]] = (), password: str = "user-pass-1"
) -> str:
    """A new pve user holding exactly ``privs`` on each path (one custom role per grant)."""
    userid = f"{unique('u')}@pve"
    reply = await admin.post("/access/users", userid=userid, password=password)
    assert reply.status == 200, reply
    for path, privs in grants:
        await grant(admin, path, privs, users=userid)
    return userid


async def grant(admin: Api, path: str, privs: list[str], **subject: str) -> str:
    """A custom role with exactly ``privs``, granted on ``path`` (users=, groups= or tokens=)."""
    role = unique("R")
    reply = await admin.post("/access/roles", roleid=role, privs=",".join(privs))
    assert reply.status == 200, reply
    reply = await admin.put("/access/acl", path=path, roles=role, **subject)
    assert reply.status == 200, reply
    return role
