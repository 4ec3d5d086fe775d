"""The ``iam`` bucket's tables on the bus, and the audit trail publisher."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from rucher.bus import KV, Bus
from rucher.iam.context import Tables
from rucher.proto.base import Event, Subject
from rucher.proto.iam import audit_address
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
from rucher.proto.streams import IAM

E = TypeVar("E", bound=Event)
T = TypeVar("T", bound=msgspec.Struct)


def bucket_tables(bus: Bus) -> Tables:
    """One typed KV handle per record kind of the ``iam`` bucket."""

    def table(kind: type[T]) -> KV[T]:
        return KV(bus, IAM, kind)

    return Tables(
        users=table(UserRecord),
        groups=table(GroupRecord),
        roles=table(RoleRecord),
        acl=table(AclRecord),
        tokens=table(TokenRecord),
        pools=table(PoolRecord),
        domains=table(RealmRecord),
        keys=table(TicketKeys),
        oidc=table(OpenIdLoginState),
        throttle=table(LoginThrottle),
    )


class BusAudit:
    """Publishes each security event on its ``evt.iam.*`` subject and its ``audit.iam.*`` copy."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def emit(self, subject: Subject[E], event: E) -> None:
        """Store the event in EVENTS and in AUDIT (each de-duplicated by its event id)."""
        address = subject.to(node=self.bus.node)
        await self.bus.publish(address, event)
        await self.bus.publish(audit_address(address), event)
