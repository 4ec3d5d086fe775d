"""The cluster's IAM configuration kept in memory, for fast authentication and authorization.

:class:`AuthzView` watches the ``iam`` bucket (users, groups, roles, ACL entries, tokens, pools,
realms and the ticket keys), rebuilds its :class:`~rucher.pve.acl.AclIndex` a few milliseconds
after any change, and answers the per-request questions synchronously from memory: is this
ticket, CSRF token or API token valid, and does this caller hold these privileges here. Every
gateway and IAM instance holds one, so a change is seen everywhere within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from rucher.bus import KV, Bus, Operation, RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import (
    ACL,
    DOMAINS,
    GROUPS,
    KEYS,
    POOLS,
    ROLES,
    TICKET_KEYS_KEY,
    TOKENS,
    USERS,
    AclRecord,
    GroupRecord,
    PoolRecord,
    RealmRecord,
    RoleRecord,
    TicketKeys,
    TokenRecord,
    UserRecord,
)
from rucher.proto.streams import IAM
from rucher.pve.acl import AclIndex
from rucher.pve.ticket import TicketError, verify_csrf_token, verify_ticket
from rucher.pve.tokens import TokenError, parse_header, secret_matches

log = structlog.get_logger("rucher.authz")

REBUILD_DELAY = 0.02  # coalesce a burst of changes into one rebuild


@dataclass
class IamState:
    """Every IAM record, by bucket key."""

    users: dict[str, UserRecord] = field(default_factory=dict)
    groups: dict[str, GroupRecord] = field(default_factory=dict)
    roles: dict[str, RoleRecord] = field(default_factory=dict)
    acl: dict[str, AclRecord] = field(default_factory=dict)
    tokens: dict[str, TokenRecord] = field(default_factory=dict)
    pools: dict[str, PoolRecord] = field(default_factory=dict)
    domains: dict[str, RealmRecord] = field(default_factory=dict)
    keys: dict[str, TicketKeys] = field(default_factory=dict)

    def index(self) -> AclIndex:
        """A fresh permission index of this state."""
        return AclIndex.build(
            self.users.values(),
            self.groups.values(),
            self.roles.values(),
            self.acl.values(),
            self.tokens.values(),
            pools=self.pools.values(),
        )


def _unauthenticated(message: str) -> RucherError:
    return RucherError(ErrorCode.UNAUTHENTICATED, message)


class AuthzView:
    """A live, in-memory view of the ``iam`` bucket with a permission index kept current.

    Construct it, ``await start()`` (returns once the whole bucket is loaded), then call its
    synchronous methods on every request; ``await stop()`` at shutdown.
    """

    def __init__(self, bus: Bus, *, rebuild_delay: float = REBUILD_DELAY) -> None:
        self.bus = bus
        self.state = IamState()
        self.index = AclIndex.build((), (), (), (), ())
        self.generation = 0
        self.rebuild_delay = rebuild_delay
        self._tasks: list[asyncio.Task[None]] = []
        self._loaded: dict[str, asyncio.Event] = {}
        self._dirty = asyncio.Event()
        self._listeners: list[Callable[[int], None]] = []

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Load every IAM record and start following changes."""
        watched: list[tuple[str, Any, dict[str, Any]]] = [
            (USERS, UserRecord, self.state.users),
            (GROUPS, GroupRecord, self.state.groups),
            (ROLES, RoleRecord, self.state.roles),
            (ACL, AclRecord, self.state.acl),
            (TOKENS, TokenRecord, self.state.tokens),
            (POOLS, PoolRecord, self.state.pools),
            (DOMAINS, RealmRecord, self.state.domains),
            (KEYS, TicketKeys, self.state.keys),
        ]
        for prefix, kind, target in watched:
            self._loaded[prefix] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._follow(prefix, kind, target)))
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(event.wait() for event in self._loaded.values()))
        self._rebuild()
        self._tasks.append(asyncio.create_task(self._rebuilder()))
        log.info("authz_view_started", users=len(self.state.users), acl=len(self.state.acl))

    async def stop(self) -> None:
        """Stop following changes."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def on_rebuild(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(generation)`` after each rebuild of the index."""
        self._listeners.append(listener)

    async def _follow(
        self, prefix: str, kind: type[msgspec.Struct], target: dict[str, Any]
    ) -> None:
        kv: KV[Any] = KV(self.bus, IAM, kind)
        while True:
            try:
                async with kv.watch(f"{prefix}.>") as updates:
                    async for entry in updates:
                        if entry is None:
                            self._loaded[prefix].set()
                            continue
                        if entry.operation is Operation.PUT and entry.value is not None:
                            target[entry.key] = entry.value
                        else:
                            target.pop(entry.key, None)
                        if self._loaded[prefix].is_set():
                            self._dirty.set()
            except RucherError as err:
                # The watch could not be set up (NATS failing over): follow again from scratch.
                log.warning("authz_watch_failed", prefix=prefix, error=err.message)
                await asyncio.sleep(0.5)

    async def _rebuilder(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.rebuild_delay)
            self._dirty.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        started = time.perf_counter()
        self.index = self.state.index()
        self.generation += 1
        log.debug(
            "authz_index_rebuilt",
            generation=self.generation,
            acl=len(self.state.acl),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        for listener in self._listeners:
            listener(self.generation)

    # Authentication -------------------------------------------------------------------------

    @property
    def ticket_keys(self) -> TicketKeys | None:
        """The ticket signing keys, once the IAM service has created them."""
        return self.state.keys.get(TICKET_KEYS_KEY)

    def _verification_keys(self) -> list[Any]:
        keys = self.ticket_keys
        if keys is None:
            raise RucherError(ErrorCode.UNAVAILABLE, "no ticket keys yet: is the IAM service up?")
        return [keys.current, keys.previous]

    def verify_ticket(self, ticket: str, now: float | None = None) -> str:
        """The user of a valid ticket; ``unauthenticated`` if invalid, expired or disabled."""
        moment = time.time() if now is None else now
        try:
            userid = verify_ticket(self._verification_keys(), ticket, moment)
        except TicketError as err:
            raise _unauthenticated(f"invalid ticket: {err}") from err
        if not self.index.active(userid, moment):
            raise _unauthenticated("user disabled, expired or deleted")
        return userid

    def verify_csrf(self, userid: str, token: str, now: float | None = None) -> None:
        """Raise ``unauthenticated`` unless ``token`` is a valid CSRF token for ``userid``."""
        moment = time.time() if now is None else now
        try:
            verify_csrf_token(self._verification_keys(), userid, token, moment)
        except TicketError as err:
            raise _unauthenticated(f"invalid CSRF prevention token: {err}") from err

    def verify_api_token(self, header_value: str, now: float | None = None) -> str:
        """The token id of a valid ``PVEAPIToken=USER@REALM!TOKENID=SECRET`` header value."""
        try:
            tokenid, secret = parse_header(header_value)
        except TokenError as err:
            raise _unauthenticated(f"invalid API token: {err}") from err
        token = self.index.tokens.get(tokenid)
        if token is None or not secret_matches(token, secret):
            raise _unauthenticated("invalid API token")
        if not self.index.active(tokenid, now):
            raise _unauthenticated("API token expired, or its user disabled or expired")
        return tokenid

    # Authorization --------------------------------------------------------------------------

    def allowed(
        self, authid: str, path: str, privs: list[str] | tuple[str, ...], any_: bool = False
    ) -> bool:
        """Whether ``authid`` holds ``privs`` (all, or with ``any_`` one) on ``path``."""
        return self.index.allowed(authid, path, privs, any_)

    def privileges(self, authid: str, path: str) -> frozenset[str]:
        """Every privilege ``authid`` holds on ``path``."""
        return self.index.privileges(authid, path)

    def permissions(self, authid: str, path: str | None = None) -> dict[str, dict[str, bool]]:
        """GET /access/permissions for ``authid``: path -> privilege -> propagates."""
        return self.index.effective_permissions(authid, path)

    def capabilities(self, authid: str) -> dict[str, dict[str, int]]:
        """The ``cap`` object of a ticket reply."""
        return self.index.capabilities(authid)
