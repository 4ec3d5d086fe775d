"""Identity and access state: the ``iam`` bucket's records, and their listings without secrets.

Key layout of the bucket (each id one key token, see ``rucher.proto.keys``): ``users.{userid}``,
``groups.{groupid}``, ``roles.{roleid}`` (custom roles only), ``acl.{path}.{type}.{ugid}.{roleid}``,
``tokens.{userid}.{tokenid}``, ``pools.{poolid}``, ``domains.{realm}``, ``keys.ticket``, and two
expiring kinds: ``oidc.{state}`` (pending OpenID logins) and ``throttle.{source}`` (failed logins).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.common import AuthId, PoolId, StorageId, UserId
from rucher.proto.keys import make_key

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


class AclSubjectType(StrEnum):
    """Whom an ACL entry grants a role to."""

    USER = "user"
    GROUP = "group"
    TOKEN = "token"  # noqa: S105 - a kind of ACL subject, not a secret


Realm = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,31}$",
        description="An authentication realm's id (pve-realm), such as pam, pve or corp.",
    ),
]
TokenName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,63}$",
        description="An API token's id within its user (pve-tokenid's last part).",
    ),
]
Text = Annotated[str, msgspec.Meta(max_length=4096, description="Free text, bounded.")]
Secret = Annotated[str, msgspec.Meta(max_length=4096, description="A password or code.")]


class RealmType(StrEnum):
    """How a realm authenticates its users."""

    PAM = "pam"
    PVE = "pve"
    OPENID = "openid"


class TotpEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One TOTP second factor of a user: its id, base32 secret and parameters."""

    id: str
    secret: str
    description: Text = ""
    created: float = 0.0
    enable: bool = True
    digits: int = 6
    period: int = 30


class UserRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The ``iam`` bucket's value under ``users.{userid}``: a user, its groups and secrets.

    ``expire`` is a Unix time (0: never). ``password_hash`` (argon2id) is set for ``pve`` realm
    users only; ``totp_last_step`` refuses a TOTP code used twice.
    """

    userid: UserId
    enable: bool = True
    expire: int = 0
    firstname: Text = ""
    lastname: Text = ""
    email: Text = ""
    comment: Text = ""
    groups: tuple[GroupId, ...] = ()
    keys: Text = ""
    password_hash: str = ""
    totp: tuple[TotpEntry, ...] = ()
    totp_last_step: int = 0
    created: float = 0.0


class GroupRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The ``iam`` bucket's value under ``groups.{groupid}``; members are in the user records."""

    groupid: GroupId
    comment: Text = ""


class RoleRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A custom role under ``roles.{roleid}``; built-in roles are not stored."""

    roleid: RoleId
    privs: tuple[str, ...] = ()


class AclRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One ACL entry under ``acl.{path}.{type}.{ugid}.{roleid}``: a role granted on a path."""

    path: AclPath
    ugid: str
    type: AclSubjectType
    roleid: RoleId
    propagate: bool = True


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An API token under ``tokens.{userid}.{tokenid}``; only the secret's SHA-256 is kept."""

    tokenid: AuthId
    privsep: bool = True
    expire: int = 0
    comment: Text = ""
    secret_hash: str = ""


class PoolRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A resource pool under ``pools.{poolid}``: ACLs on ``/pool/{poolid}`` reach its members."""

    poolid: PoolId
    comment: Text = ""
    vms: tuple[int, ...] = ()
    storage: tuple[StorageId, ...] = ()


class RealmRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An authentication realm under ``domains.{realm}``; the OpenID fields apply to ``openid``.

    ``groups_claim`` may be a dotted path into the claims (``realm_access.roles``); each value
    becomes the group ``{value}-{realm}``.
    """

    realm: Realm
    type: RealmType
    comment: Text = ""
    default: bool = False
    issuer_url: Text = ""
    client_id: Text = ""
    client_key: Text = ""
    autocreate: bool = False
    username_claim: Text = ""
    scopes: Text = "email profile"
    groups_claim: Text = ""
    groups_autocreate: bool = False
    groups_overwrite: bool = False
    prompt: Text = ""
    acr_values: Text = ""
    query_userinfo: bool = True


class SigningKey(msgspec.Struct, frozen=True, kw_only=True):
    """A ticket signing key: an id, the secret (base64) and when it was made."""

    id: str
    secret: str
    created: float


class TicketKeys(msgspec.Struct, frozen=True, kw_only=True):
    """The ticket and CSRF signing keys under ``keys.ticket``: rotated daily, previous kept."""

    current: SigningKey
    previous: SigningKey | None = None


class OpenIdLoginState(msgspec.Struct, frozen=True, kw_only=True):
    """A pending OpenID login under ``oidc.{state}`` (expires after 10 minutes)."""

    state: str
    realm: Realm
    redirect_url: Text
    code_verifier: str
    nonce: str
    created: float


class LoginThrottle(msgspec.Struct, frozen=True, kw_only=True):
    """Recent failed logins from one source under ``throttle.{source}`` (expires)."""

    source: str
    failures: int = 0
    last: float = 0.0


# Views without secrets, for replies ----------------------------------------------------------


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An API token as listed: never its secret."""

    tokenid: AuthId
    privsep: bool = True
    expire: int = 0
    comment: Text = ""


class UserInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A user as listed: no password hash, TOTP secrets only as types."""

    userid: UserId
    enable: bool = True
    expire: int = 0
    firstname: Text = ""
    lastname: Text = ""
    email: Text = ""
    comment: Text = ""
    groups: tuple[GroupId, ...] = ()
    keys: Text = ""
    realm_type: RealmType | None = None
    tfa: tuple[str, ...] = ()
    tokens: tuple[TokenInfo, ...] = ()


class GroupInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A group as listed, with its members."""

    groupid: GroupId
    comment: Text = ""
    members: tuple[UserId, ...] = ()


class RoleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A role as listed; ``special`` marks Proxmox's built-in roles."""

    roleid: RoleId
    privs: tuple[str, ...] = ()
    special: bool = False


class RealmInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A realm as listed: every option but the OpenID client secret."""

    realm: Realm
    type: RealmType
    comment: Text = ""
    default: bool = False
    issuer_url: Text = ""
    client_id: Text = ""
    autocreate: bool = False
    username_claim: Text = ""
    scopes: Text = ""
    groups_claim: Text = ""
    groups_autocreate: bool = False
    groups_overwrite: bool = False
    prompt: Text = ""
    acr_values: Text = ""
    query_userinfo: bool = True


class TfaEntryInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A second factor as listed: never its secret."""

    userid: UserId
    id: str
    type: str = "totp"
    description: Text = ""
    created: float = 0.0
    enable: bool = True


# Keys ------------------------------------------------------------------------------------

USERS = "users"
GROUPS = "groups"
ROLES = "roles"
ACL = "acl"
TOKENS = "tokens"
POOLS = "pools"
DOMAINS = "domains"
KEYS = "keys"
OIDC = "oidc"
THROTTLE = "throttle"
TICKET_KEYS_KEY = make_key(KEYS, "ticket")


def user_key(userid: str) -> str:
    """The key of a user's record."""
    return make_key(USERS, userid)


def group_key(groupid: str) -> str:
    """The key of a group's record."""
    return make_key(GROUPS, groupid)


def role_key(roleid: str) -> str:
    """The key of a custom role's record."""
    return make_key(ROLES, roleid)


def acl_key(entry: AclRecord) -> str:
    """The key of one ACL entry."""
    return make_key(ACL, entry.path, entry.type.value, entry.ugid, entry.roleid)


def token_key(userid: str, name: str) -> str:
    """The key of a user's API token."""
    return make_key(TOKENS, userid, name)


def pool_key(poolid: str) -> str:
    """The key of a resource pool's record."""
    return make_key(POOLS, poolid)


def domain_key(realm: str) -> str:
    """The key of a realm's record."""
    return make_key(DOMAINS, realm)
