"""What the IAM operations work with: the bucket's tables, the live view, the audit trail."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from rucher.authz import IamState
from rucher.bus import Entry, RucherError
from rucher.iam.config import IamSettings
from rucher.proto.base import Event, Subject
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import (
    AclRecord,
    GroupRecord,
    LoginThrottle,
    OpenIdLoginState,
    PoolRecord,
    RealmRecord,
    RoleRecord,
    TicketKeys,
    TokenRecord,
    UserRecord,
)
from rucher.pve.acl import AclIndex

T = TypeVar("T", bound=msgspec.Struct)
E = TypeVar("E", bound=Event)
CAS_ATTEMPTS = 10


class Table(Protocol[T]):
    """Typed access to one kind of record in the ``iam`` bucket (a ``rucher.bus.KV``)."""

    async def get(self, key: str) -> Entry[T] | None:
        """The current entry, or None."""
        ...

    async def create(self, key: str, value: T, *, ttl: float | None = None) -> int:
        """Write if absent; ``exists`` otherwise."""
        ...

    async def update(self, key: str, value: T, *, revision: int, ttl: float | None = None) -> int:
        """Write if unchanged since ``revision``; ``conflict`` otherwise."""
        ...

    async def put(self, key: str, value: T, *, ttl: float | None = None) -> int:
        """Write unconditionally."""
        ...

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Remove the key."""
        ...

    async def entries(self, pattern: str = ">") -> list[Entry[T]]:
        """Every current entry whose key matches ``pattern``."""
        ...


@dataclass(frozen=True)
class Tables:
    """Every table of the ``iam`` bucket."""

    users: Table[UserRecord]
    groups: Table[GroupRecord]
    roles: Table[RoleRecord]
    acl: Table[AclRecord]
    tokens: Table[TokenRecord]
    pools: Table[PoolRecord]
    domains: Table[RealmRecord]
    keys: Table[TicketKeys]
    oidc: Table[OpenIdLoginState]
    throttle: Table[LoginThrottle]


class View(Protocol):
    """The live in-memory view of the bucket (``rucher.authz.AuthzView``)."""

    state: IamState
    index: AclIndex

    @property
    def ticket_keys(self) -> TicketKeys | None:
        """The current signing keys."""
        ...


class Audit(Protocol):
    """Where security events go: the events stream and the audit trail."""

    async def emit(self, subject: Subject[E], event: E) -> None:
        """Publish ``event`` on ``subject`` and its audit copy."""
        ...


@dataclass
class Context:
    """Everything an IAM operation needs, passed in explicitly."""

    tables: Tables
    view: View
    audit: Audit
    settings: IamSettings
    node: str

    def meta(self) -> dict[str, Any]:
        """An event's id, node and time."""
        return {"event_id": uuid.uuid4().hex, "node": self.node, "time": time.time()}


def invalid(field: str, message: str) -> RucherError:
    """A bad parameter, naming it."""
    return RucherError(ErrorCode.INVALID, message, details={"field": field})


def not_found(field: str, message: str) -> RucherError:
    """A missing object, naming the parameter that named it."""
    return RucherError(ErrorCode.NOT_FOUND, message, details={"field": field})


def exists(field: str, message: str) -> RucherError:
    """An id already taken, naming the parameter."""
    return RucherError(ErrorCode.EXISTS, message, details={"field": field})


async def change(
    table: Table[T], key: str, edit: Callable[[T], T], missing: RucherError
) -> tuple[T, T]:
    """Read-modify-write ``key`` by compare-and-set, retrying on a concurrent change.

    Returns ``(old, new)``; raises ``missing`` when the key is absent.
    """
    for _ in range(CAS_ATTEMPTS):
        entry = await table.get(key)
        if entry is None or entry.value is None:
            raise missing
        new = edit(entry.value)
        try:
            await table.update(key, new, revision=entry.revision)
        except RucherError as err:
            if err.code is ErrorCode.CONFLICT:
                continue
            raise
        return entry.value, new
    raise RucherError(ErrorCode.CONFLICT, f"{key} kept changing; try again")
