"""Identity and access: security events for the audit trail, and authorization cache invalidation.

Every login and every change to users, groups, roles, pools, ACL entries and API tokens is an
event, published on ``evt.iam.*`` and copied on ``audit.iam.*`` (:func:`audit_address`) into the
AUDIT stream, which keeps the trail for a year. The ``iam`` bucket's records and the IAM
service's requests (``rpc.iam.*``, all cluster-wide) follow the events. :class:`AuthzInvalidated`
tells every gateway to drop cached authorization decisions, so that an ACL change applies
everywhere within a second. Secrets (passwords, token values, tickets) never travel in events.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, TypeVar

import msgspec

from rucher.proto.base import Address, Command, Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.common import AuthId, ChangeKind, Done, PoolId, Query, StorageId, UserId
from rucher.proto.iam_state import (
    AclPath,
    AclRecord,
    AclSubjectType,
    GroupId,
    GroupInfo,
    PoolRecord,
    Realm,
    RealmInfo,
    RealmRecord,
    RoleId,
    RoleInfo,
    Secret,
    Text,
    TfaEntryInfo,
    TokenInfo,
    TokenName,
    UserInfo,
)


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


class RealmChanged(Event, frozen=True, kw_only=True, tag="iam.realm.changed"):
    """An authentication realm was added, changed or removed."""

    realm: Realm
    change: ChangeKind
    actor: AuthId


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
REALM_CHANGED = Subject(
    "evt.iam.realm_changed.{node}", RealmChanged, Kind.EVENT, Scope.NODE, "A realm changed."
)
AUTHZ_INVALIDATED = Subject(
    "evt.iam.authz_invalidated.{node}",
    AuthzInvalidated,
    Kind.EVENT,
    Scope.NODE,
    "Cached authorization decisions must be dropped.",
)

# Requests and replies ------------------------------------------------------------------------


class Login(Command, frozen=True, kw_only=True, tag="iam.login"):
    """Authenticate (a password, a ticket to renew, or a TFA response) for a ticket."""

    username: Annotated[str, msgspec.Meta(max_length=256)]
    password: Secret
    realm: str | None = None
    otp: Secret | None = None
    tfa_challenge: Secret | None = None
    source: str = ""


class LoginGranted(Reply, frozen=True, kw_only=True, tag="iam.login.granted"):
    """A ticket and CSRF token; with ``need_tfa`` the ticket is only a TFA challenge."""

    username: UserId
    ticket: str
    csrf_token: str = ""
    cap: dict[str, dict[str, int]] = {}
    need_tfa: bool = False
    clustername: str | None = None


class OpenIdAuthUrl(Command, frozen=True, kw_only=True, tag="iam.openid.auth_url"):
    """Start an OpenID login: the provider URL to send the browser to."""

    realm: Realm
    redirect_url: Text


class OpenIdAuthUrlIssued(Reply, frozen=True, kw_only=True, tag="iam.openid.auth_url_issued"):
    """Where to send the browser to log in at the provider."""

    url: str


class OpenIdLogin(Command, frozen=True, kw_only=True, tag="iam.openid.login"):
    """Finish an OpenID login with the provider's code and state."""

    code: Text
    state: Text
    redirect_url: Text
    source: str = ""


class UserCreate(Command, frozen=True, kw_only=True, tag="iam.user.create"):
    """Create a user (``password`` only in the pve realm)."""

    actor: AuthId
    userid: UserId
    password: Secret | None = None
    enable: bool = True
    expire: int = 0
    firstname: Text = ""
    lastname: Text = ""
    email: Text = ""
    comment: Text = ""
    groups: tuple[GroupId, ...] = ()
    keys: Text = ""


class UserUpdate(Command, frozen=True, kw_only=True, tag="iam.user.update"):
    """Change a user; fields left ``None`` stay, ``append`` adds to the groups."""

    actor: AuthId
    userid: UserId
    enable: bool | None = None
    expire: int | None = None
    firstname: Text | None = None
    lastname: Text | None = None
    email: Text | None = None
    comment: Text | None = None
    groups: tuple[GroupId, ...] | None = None
    append: bool = False
    keys: Text | None = None


class UserDelete(Command, frozen=True, kw_only=True, tag="iam.user.delete"):
    """Delete a user, its tokens and its ACL entries."""

    actor: AuthId
    userid: UserId


class PasswordChange(Command, frozen=True, kw_only=True, tag="iam.password.change"):
    """Set a pve user's password; ``confirmation_password`` is the actor's own."""

    actor: AuthId
    userid: UserId
    password: Secret
    confirmation_password: Secret | None = None


class GroupCreate(Command, frozen=True, kw_only=True, tag="iam.group.create"):
    """Create a group."""

    actor: AuthId
    groupid: GroupId
    comment: Text = ""


class GroupUpdate(Command, frozen=True, kw_only=True, tag="iam.group.update"):
    """Change a group's comment."""

    actor: AuthId
    groupid: GroupId
    comment: Text = ""


class GroupDelete(Command, frozen=True, kw_only=True, tag="iam.group.delete"):
    """Delete a group: its members leave it and its ACL entries go."""

    actor: AuthId
    groupid: GroupId


class RoleCreate(Command, frozen=True, kw_only=True, tag="iam.role.create"):
    """Create a custom role."""

    actor: AuthId
    roleid: RoleId
    privs: tuple[str, ...] = ()


class RoleUpdate(Command, frozen=True, kw_only=True, tag="iam.role.update"):
    """Set (or with ``append`` extend) a custom role's privileges."""

    actor: AuthId
    roleid: RoleId
    privs: tuple[str, ...] = ()
    append: bool = False


class RoleDelete(Command, frozen=True, kw_only=True, tag="iam.role.delete"):
    """Delete a custom role and the ACL entries granting it."""

    actor: AuthId
    roleid: RoleId


class AclUpdate(Command, frozen=True, kw_only=True, tag="iam.acl.update"):
    """Grant (or with ``delete`` revoke) roles on a path, as ``PUT /access/acl``."""

    actor: AuthId
    path: AclPath
    roles: tuple[RoleId, ...]
    users: tuple[UserId, ...] = ()
    groups: tuple[GroupId, ...] = ()
    tokens: tuple[AuthId, ...] = ()
    propagate: bool = True
    delete: bool = False


class TokenCreate(Command, frozen=True, kw_only=True, tag="iam.token.create"):
    """Create an API token for a user; the reply holds its secret, shown once."""

    actor: AuthId
    userid: UserId
    tokenid: TokenName
    privsep: bool = True
    expire: int = 0
    comment: Text = ""


class TokenCreated(Reply, frozen=True, kw_only=True, tag="iam.token.created"):
    """A new token's full id, its settings and its secret value."""

    full_tokenid: AuthId
    info: TokenInfo
    value: str


class TokenUpdate(Command, frozen=True, kw_only=True, tag="iam.token.update"):
    """Change a token's settings; fields left ``None`` stay."""

    actor: AuthId
    userid: UserId
    tokenid: TokenName
    privsep: bool | None = None
    expire: int | None = None
    comment: Text | None = None


class TokenDelete(Command, frozen=True, kw_only=True, tag="iam.token.delete"):
    """Delete an API token and its ACL entries."""

    actor: AuthId
    userid: UserId
    tokenid: TokenName


class PoolCreate(Command, frozen=True, kw_only=True, tag="iam.pool.create"):
    """Create a resource pool."""

    actor: AuthId
    poolid: PoolId
    comment: Text = ""


class PoolUpdate(Command, frozen=True, kw_only=True, tag="iam.pool.update"):
    """Change a pool: comment, and add (or with ``delete`` remove) guests and storages."""

    actor: AuthId
    poolid: PoolId
    comment: Text | None = None
    vms: tuple[int, ...] = ()
    storage: tuple[StorageId, ...] = ()
    delete: bool = False
    allow_move: bool = False


class PoolDelete(Command, frozen=True, kw_only=True, tag="iam.pool.delete"):
    """Delete an empty pool and its ACL entries."""

    actor: AuthId
    poolid: PoolId


class DomainCreate(Command, frozen=True, kw_only=True, tag="iam.domain.create"):
    """Add an authentication realm."""

    actor: AuthId
    config: RealmRecord


class DomainUpdate(Command, frozen=True, kw_only=True, tag="iam.domain.update"):
    """Change a realm's options: ``changes`` are set, ``delete`` names options to reset."""

    actor: AuthId
    realm: Realm
    changes: dict[str, str | bool] = {}
    delete: tuple[str, ...] = ()


class DomainDelete(Command, frozen=True, kw_only=True, tag="iam.domain.delete"):
    """Remove an authentication realm (pam and pve stay)."""

    actor: AuthId
    realm: Realm


class TfaAdd(Command, frozen=True, kw_only=True, tag="iam.tfa.add"):
    """Add a TOTP factor: its ``otpauth://`` URI and a current code proving it works.

    ``password`` is the actor's own current password: everyone but root@pam must give it.
    """

    actor: AuthId
    userid: UserId
    totp: Text
    value: Secret
    description: Text = ""
    password: Secret | None = None


class TfaAdded(Reply, frozen=True, kw_only=True, tag="iam.tfa.added"):
    """The new second factor's id."""

    id: str


class TfaDelete(Command, frozen=True, kw_only=True, tag="iam.tfa.delete"):
    """Remove one of a user's second factors.

    ``password`` is the actor's own current password: everyone but root@pam must give it.
    """

    actor: AuthId
    userid: UserId
    id: str
    password: Secret | None = None


class TfaUpdate(Command, frozen=True, kw_only=True, tag="iam.tfa.update"):
    """Change a second factor's description or whether it counts at login; ``None`` stays.

    ``password`` is the actor's own current password: everyone but root@pam must give it.
    """

    actor: AuthId
    userid: UserId
    id: str
    description: Text | None = None
    enable: bool | None = None
    password: Secret | None = None


class TfaVerify(Command, frozen=True, kw_only=True, tag="iam.tfa.verify"):
    """Check a TOTP code of a user (each code is accepted once)."""

    userid: UserId
    code: Secret


class UserListQuery(Query, frozen=True, kw_only=True, tag="iam.user.list"):
    """List users; ``full`` adds their tokens."""

    enabled: bool | None = None
    full: bool = False


class UserList(Reply, frozen=True, kw_only=True, tag="iam.user.listing"):
    """The users."""

    users: tuple[UserInfo, ...]


class GroupListQuery(Query, frozen=True, kw_only=True, tag="iam.group.list"):
    """List groups with their members."""


class GroupList(Reply, frozen=True, kw_only=True, tag="iam.group.listing"):
    """The groups."""

    groups: tuple[GroupInfo, ...]


class RoleListQuery(Query, frozen=True, kw_only=True, tag="iam.role.list"):
    """List built-in and custom roles."""


class RoleList(Reply, frozen=True, kw_only=True, tag="iam.role.listing"):
    """The roles."""

    roles: tuple[RoleInfo, ...]


class AclListQuery(Query, frozen=True, kw_only=True, tag="iam.acl.list"):
    """List every ACL entry."""


class AclList(Reply, frozen=True, kw_only=True, tag="iam.acl.listing"):
    """The ACL entries."""

    entries: tuple[AclRecord, ...]


class TokenListQuery(Query, frozen=True, kw_only=True, tag="iam.token.list"):
    """List a user's API tokens."""

    userid: UserId


class TokenList(Reply, frozen=True, kw_only=True, tag="iam.token.listing"):
    """The tokens."""

    tokens: tuple[TokenInfo, ...]


class PoolListQuery(Query, frozen=True, kw_only=True, tag="iam.pool.list"):
    """List resource pools with their members."""


class PoolList(Reply, frozen=True, kw_only=True, tag="iam.pool.listing"):
    """The pools."""

    pools: tuple[PoolRecord, ...]


class DomainListQuery(Query, frozen=True, kw_only=True, tag="iam.domain.list"):
    """List authentication realms."""


class DomainList(Reply, frozen=True, kw_only=True, tag="iam.domain.listing"):
    """The realms."""

    domains: tuple[RealmInfo, ...]


class TfaListQuery(Query, frozen=True, kw_only=True, tag="iam.tfa.list"):
    """List second factors, of one user or of everyone."""

    userid: UserId | None = None


class TfaList(Reply, frozen=True, kw_only=True, tag="iam.tfa.listing"):
    """The second factors."""

    entries: tuple[TfaEntryInfo, ...]


T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)


def _rpc(request: type[T], reply: type[R], summary: str) -> RpcSubject[T, R]:
    tag = request.__struct_config__.tag
    assert isinstance(tag, str)
    context, name = tag.split(".", 1)
    pattern = f"rpc.{context}.{name.replace('.', '_')}"
    return RpcSubject(pattern, request, Kind.RPC, Scope.CLUSTER, summary, reply=reply)


LOGIN = _rpc(Login, LoginGranted, "Log in (or renew a ticket) and get a ticket.")
OPENID_AUTH_URL = _rpc(OpenIdAuthUrl, OpenIdAuthUrlIssued, "Start an OpenID login.")
OPENID_LOGIN = _rpc(OpenIdLogin, LoginGranted, "Finish an OpenID login.")
USER_CREATE = _rpc(UserCreate, Done, "Create a user.")
USER_UPDATE = _rpc(UserUpdate, Done, "Change a user.")
USER_DELETE = _rpc(UserDelete, Done, "Delete a user.")
USER_LIST = _rpc(UserListQuery, UserList, "List users.")
PASSWORD_CHANGE = _rpc(PasswordChange, Done, "Change a user's password.")
GROUP_CREATE = _rpc(GroupCreate, Done, "Create a group.")
GROUP_UPDATE = _rpc(GroupUpdate, Done, "Change a group.")
GROUP_DELETE = _rpc(GroupDelete, Done, "Delete a group.")
GROUP_LIST = _rpc(GroupListQuery, GroupList, "List groups.")
ROLE_CREATE = _rpc(RoleCreate, Done, "Create a custom role.")
ROLE_UPDATE = _rpc(RoleUpdate, Done, "Change a custom role.")
ROLE_DELETE = _rpc(RoleDelete, Done, "Delete a custom role.")
ROLE_LIST = _rpc(RoleListQuery, RoleList, "List roles.")
ACL_UPDATE = _rpc(AclUpdate, Done, "Grant or revoke roles on a path.")
ACL_LIST = _rpc(AclListQuery, AclList, "List ACL entries.")
TOKEN_CREATE = _rpc(TokenCreate, TokenCreated, "Create an API token.")
TOKEN_UPDATE = _rpc(TokenUpdate, Done, "Change an API token.")
TOKEN_DELETE = _rpc(TokenDelete, Done, "Delete an API token.")
TOKEN_LIST = _rpc(TokenListQuery, TokenList, "List a user's API tokens.")
POOL_CREATE = _rpc(PoolCreate, Done, "Create a resource pool.")
POOL_UPDATE = _rpc(PoolUpdate, Done, "Change a resource pool.")
POOL_DELETE = _rpc(PoolDelete, Done, "Delete a resource pool.")
POOL_LIST = _rpc(PoolListQuery, PoolList, "List resource pools.")
DOMAIN_CREATE = _rpc(DomainCreate, Done, "Add an authentication realm.")
DOMAIN_UPDATE = _rpc(DomainUpdate, Done, "Change an authentication realm.")
DOMAIN_DELETE = _rpc(DomainDelete, Done, "Remove an authentication realm.")
DOMAIN_LIST = _rpc(DomainListQuery, DomainList, "List authentication realms.")
TFA_ADD = _rpc(TfaAdd, TfaAdded, "Add a TOTP second factor.")
TFA_DELETE = _rpc(TfaDelete, Done, "Remove a second factor.")
TFA_UPDATE = _rpc(TfaUpdate, Done, "Change a second factor's description or state.")
TFA_VERIFY = _rpc(TfaVerify, Done, "Check a TOTP code.")
TFA_LIST = _rpc(TfaListQuery, TfaList, "List second factors.")

AUDIT_PREFIX = "audit."


def audit_address(address: Address[T]) -> Address[T]:
    """The AUDIT stream's copy of an ``evt.iam.*`` address: ``audit.iam.*``, same payload."""
    kind = Kind.EVENT.value + "."
    if not address.subject.startswith(kind + "iam."):
        raise ValueError(f"only IAM events are audited, not {address.subject}")
    return Address(AUDIT_PREFIX + address.subject[len(kind) :], address.of)
