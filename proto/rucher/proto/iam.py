"""Identity and access: security events for the audit trail, and authorization cache invalidation.

Every login and every change to users, groups, roles, pools, ACL entries and API tokens is an
event (the audit trail). :class:`AuthzInvalidated` tells every gateway to drop cached
authorization decisions, so that an ACL change applies everywhere within a second. Secrets
(passwords, token values, tickets) never travel in these events.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Event, Kind, Scope, Subject
from rucher.proto.common import AuthId, ChangeKind, PoolId, UserId

GroupId = Annotated[
    str,
    msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="A group's id (pve-groupid)."),
]
RoleId = Annotated[
    str,
    msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="A role's id (pve-roleid)."),
]
AclPath = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^/[^\s]{0,255}$", description="A permission path, such as / or /vms/100."
    ),
]


class AuthMethod(StrEnum):
    """How a caller proved who it is."""

    PASSWORD = "password"  # noqa: S105 - an authentication method, not a secret
    TICKET = "ticket"
    TOKEN = "token"  # noqa: S105 - an authentication method, not a secret
    OPENID = "openid"


class LoginFailure(StrEnum):
    """Why a login failed. Clients only ever see 401; the reason is for the audit trail."""

    BAD_CREDENTIALS = "bad_credentials"
    SECOND_FACTOR = "second_factor"
    EXPIRED = "expired"
    DISABLED = "disabled"
    UNKNOWN_REALM = "unknown_realm"
    RATE_LIMITED = "rate_limited"


class AclSubjectType(StrEnum):
    """Whom an ACL entry grants a role to."""

    USER = "user"
    GROUP = "group"
    TOKEN = "token"  # noqa: S105 - a kind of ACL subject, not a secret


class InvalidationScope(StrEnum):
    """Which cached authorization decisions to drop."""

    ALL = "all"
    USER = "user"
    PATH = "path"


class LoginSucceeded(Event, frozen=True, kw_only=True, tag="iam.login.succeeded"):
    """A caller authenticated (a ticket was issued, or an API token was accepted the first time)."""

    authid: AuthId
    method: AuthMethod
    source: str
    second_factor: bool = False


class LoginFailed(Event, frozen=True, kw_only=True, tag="iam.login.failed"):
    """A login was refused; ``username`` is what the caller typed, bounded in length."""

    username: Annotated[str, msgspec.Meta(max_length=256)]
    method: AuthMethod
    source: str
    reason: LoginFailure
    realm: str | None = None


class UserChanged(Event, frozen=True, kw_only=True, tag="iam.user.changed"):
    """A user was created, updated (``fields`` names what changed) or deleted."""

    userid: UserId
    change: ChangeKind
    actor: AuthId
    fields: tuple[str, ...] = ()


class PasswordChanged(Event, frozen=True, kw_only=True, tag="iam.password.changed"):
    """A user's password was changed, by the user or by an administrator."""

    userid: UserId
    actor: AuthId


class GroupChanged(Event, frozen=True, kw_only=True, tag="iam.group.changed"):
    """A group was created, deleted, or its members or comment changed."""

    groupid: GroupId
    change: ChangeKind
    actor: AuthId
    members: tuple[UserId, ...] | None = None


class RoleChanged(Event, frozen=True, kw_only=True, tag="iam.role.changed"):
    """A custom role was created, deleted, or its privileges changed."""

    roleid: RoleId
    change: ChangeKind
    actor: AuthId
    privileges: tuple[str, ...] = ()


class PoolChanged(Event, frozen=True, kw_only=True, tag="iam.pool.changed"):
    """A resource pool or its members changed (ACLs on ``/pool/{pool}`` reach its members)."""

    poolid: PoolId
    change: ChangeKind
    actor: AuthId


class AclChanged(Event, frozen=True, kw_only=True, tag="iam.acl.changed"):
    """An ACL entry was set or removed (``change`` = deleted)."""

    path: AclPath
    ugid: str
    ugid_type: AclSubjectType
    roleid: RoleId
    propagate: bool
    change: ChangeKind
    actor: AuthId


class TokenChanged(Event, frozen=True, kw_only=True, tag="iam.token.changed"):
    """An API token was created, updated or deleted; its secret is never included."""

    tokenid: AuthId
    change: ChangeKind
    actor: AuthId
    privsep: bool = True
    expire: int | None = None


class AuthzInvalidated(Event, frozen=True, kw_only=True, tag="iam.authz.invalidated"):
    """Drop cached authorization decisions older than ``revision`` (all, one user's, or a path's).

    ``revision`` is the IAM configuration revision after the change; a cache that has already
    seen it may ignore the event, so replays and duplicates are harmless.
    """

    revision: Annotated[int, msgspec.Meta(ge=0)]
    scope: InvalidationScope
    authid: AuthId | None = None
    path: AclPath | None = None
    reason: str = ""


LOGIN_SUCCEEDED = Subject(
    "evt.iam.login_succeeded.{node}",
    LoginSucceeded,
    Kind.EVENT,
    Scope.NODE,
    "A login succeeded at the IAM instance on {node}.",
)
LOGIN_FAILED = Subject(
    "evt.iam.login_failed.{node}",
    LoginFailed,
    Kind.EVENT,
    Scope.NODE,
    "A login failed at the IAM instance on {node}.",
)
USER_CHANGED = Subject(
    "evt.iam.user_changed.{node}", UserChanged, Kind.EVENT, Scope.NODE, "A user changed."
)
PASSWORD_CHANGED = Subject(
    "evt.iam.password_changed.{node}",
    PasswordChanged,
    Kind.EVENT,
    Scope.NODE,
    "A user's password changed.",
)
GROUP_CHANGED = Subject(
    "evt.iam.group_changed.{node}", GroupChanged, Kind.EVENT, Scope.NODE, "A group changed."
)
ROLE_CHANGED = Subject(
    "evt.iam.role_changed.{node}", RoleChanged, Kind.EVENT, Scope.NODE, "A role changed."
)
POOL_CHANGED = Subject(
    "evt.iam.pool_changed.{node}", PoolChanged, Kind.EVENT, Scope.NODE, "A resource pool changed."
)
ACL_CHANGED = Subject(
    "evt.iam.acl_changed.{node}", AclChanged, Kind.EVENT, Scope.NODE, "An ACL entry changed."
)
TOKEN_CHANGED = Subject(
    "evt.iam.token_changed.{node}", TokenChanged, Kind.EVENT, Scope.NODE, "An API token changed."
)
AUTHZ_INVALIDATED = Subject(
    "evt.iam.authz_invalidated.{node}",
    AuthzInvalidated,
    Kind.EVENT,
    Scope.NODE,
    "Cached authorization decisions must be dropped.",
)
