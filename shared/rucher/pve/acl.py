"""Proxmox permission resolution: who holds which privileges on which path.

The rules are PVE::AccessControl::roles and PVE::RPCEnvironment::permissions:

- Walking the path from ``/`` down, the roles found on a level replace those inherited from
  above (a deeper path wins); a role on a level above the checked path only counts when it
  propagates.
- On one level a user's own entries beat their groups' entries; an API token sees only its own
  entries.
- If ``NoAccess`` is among the resulting roles, it is the only one.
- Roles granted on ``/pool/{pool}`` also reach the pool's guests and storages (never
  propagating, never overriding ``NoAccess``, but a pool's ``NoAccess`` wins over other roles).
- ``root@pam`` holds every privilege; a disabled or expired user (or token) holds none; a token
  with privilege separation holds the intersection of its own and its user's privileges.

An index is immutable: a change to users, groups, roles or ACL entries builds a new one, which
drops every cached decision with the old one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from rucher.proto.iam_state import (
    AclRecord,
    AclSubjectType,
    GroupRecord,
    PoolRecord,
    RoleRecord,
    TokenRecord,
    UserRecord,
)
from rucher.pve.roles import ALL_PRIVILEGES, BUILTIN_ROLES, NO_ACCESS, ROOT_USER

RoleSet = dict[str, bool]  # role -> whether it propagates
_PATH_CHARS = re.compile(r"^[A-Za-z0-9.\-_/]+$")
_CACHE_LIMIT = 200_000
_DEFAULT_PATHS = ("/", "/access", "/access/groups", "/nodes", "/pool", "/sdn", "/storage", "/vms")
# The ticket's "cap" per top-level path (RPCEnvironment::compute_api_permission).
_CAP_PRIVS = {
    "vms": re.compile(r"^(VM\.|Permissions\.Modify)"),
    "access": re.compile(r"^((User|Group)\.|Permissions\.Modify)"),
    "storage": re.compile(r"^(Datastore\.|Permissions\.Modify)"),
    "nodes": re.compile(r"^(Sys\.|Permissions\.Modify)"),
    "sdn": re.compile(r"^(SDN\.|Permissions\.Modify)"),
    "dc": re.compile(r"^(Sys\.Audit|Sys\.Modify|SDN\.)"),
    "mapping": re.compile(r"^(Mapping\.|Permissions.Modify)"),
}
_CAP_PATHS = ("/", "/nodes", "/access/groups", "/vms", "/storage", "/sdn", "/mapping")


def normalize_path(path: str) -> str | None:
    """Proxmox's ACL path normalisation; ``None`` for a path no ACL can name."""
    if not path:
        return None
    path = re.sub(r"/+", "/", path).rstrip("/") or "/"
    if not path.startswith("/"):
        path = "/" + path
    return path if _PATH_CHARS.match(path) else None


def split_tokenid(authid: str) -> tuple[str, str] | None:
    """``(userid, tokenid)`` for an API token id ``user@realm!token``, else ``None``."""
    user, bang, token = authid.partition("!")
    return (user, token) if bang and user and token else None


def _prefixes(path: str) -> list[str]:
    if path == "/":
        return ["/"]
    parts = path.split("/")[1:]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass
class _Level:
    """The ACL entries on one path, by subject kind."""

    users: dict[str, RoleSet] = field(default_factory=dict)
    groups: dict[str, RoleSet] = field(default_factory=dict)
    tokens: dict[str, RoleSet] = field(default_factory=dict)


@dataclass(frozen=True)
class _Decision:
    privileges: frozenset[str]
    propagate: dict[str, bool]


_NOTHING = _Decision(frozenset(), {})


class AclIndex:
    """Resolves privileges of users and API tokens on paths, caching every decision."""

    def __init__(
        self,
        *,
        users: dict[str, UserRecord],
        memberships: dict[str, frozenset[str]],
        role_privileges: dict[str, frozenset[str]],
        levels: dict[str, _Level],
        tokens: dict[str, TokenRecord],
        pools_of: dict[str, tuple[str, ...]],
        pools: dict[str, PoolRecord],
    ) -> None:
        self.users = users
        self.memberships = memberships
        self.role_privileges = role_privileges
        self.levels = levels
        self.tokens = tokens
        self.pools_of = pools_of
        self.pools = pools
        self._cache: dict[tuple[str, str], _Decision] = {}

    @classmethod
    def build(
        cls,
        users: Iterable[UserRecord],
        groups: Iterable[GroupRecord],
        roles: Iterable[RoleRecord],
        acl_entries: Iterable[AclRecord],
        tokens: Iterable[TokenRecord],
        *,
        pools: Iterable[PoolRecord] = (),
    ) -> AclIndex:
        """Index the IAM configuration; entries naming unknown roles or paths are ignored."""
        group_ids = {group.groupid for group in groups}
        user_map = {user.userid: user for user in users}
        memberships = {
            user.userid: frozenset(g for g in user.groups if g in group_ids)
            for user in user_map.values()
        }
        role_privileges = dict(BUILTIN_ROLES)
        for role in roles:
            if role.roleid not in BUILTIN_ROLES:
                role_privileges[role.roleid] = frozenset(role.privs) & ALL_PRIVILEGES
        levels: dict[str, _Level] = {}
        for entry in acl_entries:
            path = normalize_path(entry.path)
            if path is None or entry.roleid not in role_privileges:
                continue
            level = levels.setdefault(path, _Level())
            holder = {
                AclSubjectType.USER: level.users,
                AclSubjectType.GROUP: level.groups,
                AclSubjectType.TOKEN: level.tokens,
            }[entry.type]
            holder.setdefault(entry.ugid, {})[entry.roleid] = entry.propagate
        pool_map = {pool.poolid: pool for pool in pools}
        pools_of: dict[str, list[str]] = {}
        for pool in pool_map.values():
            for vmid in pool.vms:
                pools_of.setdefault(f"/vms/{vmid}", []).append(pool.poolid)
            for storage in pool.storage:
                pools_of.setdefault(f"/storage/{storage}", []).append(pool.poolid)
        return cls(
            users=user_map,
            memberships=memberships,
            role_privileges=role_privileges,
            levels=levels,
            tokens={token.tokenid: token for token in tokens},
            pools_of={path: tuple(sorted(names)) for path, names in pools_of.items()},
            pools=pool_map,
        )

    # Checks ---------------------------------------------------------------------------------

    def privileges(self, authid: str, path: str, now: float | None = None) -> frozenset[str]:
        """The privileges ``authid`` (a user or an API token) holds on ``path``."""
        return self._decide(authid, path, now).privileges

    def allowed(
        self,
        authid: str,
        path: str,
        privs: Iterable[str],
        any_: bool = False,
        now: float | None = None,
    ) -> bool:
        """Whether ``authid`` holds all of ``privs`` on ``path`` (with ``any_``: one of them)."""
        held = self._decide(authid, path, now).privileges
        wanted = list(privs)
        if any_:
            return any(priv in held for priv in wanted)
        return all(priv in held for priv in wanted)

    def active(self, authid: str, now: float | None = None) -> bool:
        """Whether ``authid`` exists and is enabled and unexpired (with its user, for tokens)."""
        moment = time.time() if now is None else now
        split = split_tokenid(authid)
        userid = split[0] if split else authid
        user = self.users.get(userid)
        if user is None or not user.enable or (user.expire and user.expire < moment):
            # root@pam works before its record exists, as in Proxmox.
            return userid == ROOT_USER and user is None and split is None
        if split is not None:
            token = self.tokens.get(authid)
            if token is None or (token.expire and token.expire < moment):
                return False
        return True

    def _decide(self, authid: str, path: str, now: float | None) -> _Decision:
        if not self.active(authid, now):
            return _NOTHING
        key = (authid, path)
        decision = self._cache.get(key)
        if decision is None:
            decision = self._compile(authid, path)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def _compile(self, authid: str, raw_path: str) -> _Decision:
        path = normalize_path(raw_path)
        if path is None:
            return _NOTHING
        if authid == ROOT_USER:
            return _Decision(ALL_PRIVILEGES, dict.fromkeys(ALL_PRIVILEGES, True))
        split = split_tokenid(authid)
        if split is not None:
            token = self.tokens[authid]
            owner = self._decide(split[0], path, None)
            if not token.privsep:
                return owner
        roles = self._with_pools(authid, path, self.roles(authid, path))
        propagate: dict[str, bool] = {}
        for role, flag in roles.items():
            for priv in self.role_privileges.get(role, ()):
                propagate[priv] = propagate.get(priv, False) or flag
        if split is not None:
            propagate = {
                priv: flag and owner.propagate[priv]
                for priv, flag in propagate.items()
                if priv in owner.privileges
            }
        return _Decision(frozenset(propagate), propagate)

    # Roles ----------------------------------------------------------------------------------

    def roles(self, authid: str, path: str) -> RoleSet:
        """The roles on ``path`` from ACL entries alone (PVE::AccessControl::roles, no pools)."""
        normal = normalize_path(path)
        if normal is None:
            return {}
        if authid == ROOT_USER:
            return {"Administrator": True}
        split = split_tokenid(authid)
        if split is not None:
            token = self.tokens.get(authid)
            if token is None:
                return {}
            if not token.privsep:
                return self.roles(split[0], normal)
        groups = self.memberships.get(authid, frozenset())
        roles: RoleSet = {}
        for prefix in _prefixes(normal):
            level = self.levels.get(prefix)
            if level is None:
                continue
            final = prefix == normal
            found = self._level_roles(level, authid, split is not None, groups, final)
            if found:
                roles = found
        if NO_ACCESS in roles:
            return {NO_ACCESS: roles[NO_ACCESS]}
        return roles

    @staticmethod
    def _level_roles(
        level: _Level, authid: str, is_token: bool, groups: frozenset[str], final: bool
    ) -> RoleSet:
        def applying(grants: RoleSet | None) -> RoleSet:
            if not grants:
                return {}
            return {role: flag for role, flag in grants.items() if final or flag}

        if is_token:
            return applying(level.tokens.get(authid))
        own = applying(level.users.get(authid))
        if own:
            return own  # a user's own entries always beat their groups' on the same level
        merged: RoleSet = {}
        for group in groups:
            for role, flag in applying(level.groups.get(group)).items():
                merged[role] = merged.get(role, False) or flag
        return merged

    def _with_pools(self, authid: str, path: str, roles: RoleSet) -> RoleSet:
        pools = self.pools_of.get(path)
        if not pools or NO_ACCESS in roles:
            return roles  # nothing from pools trumps a NoAccess on the path itself
        pool_roles: set[str] = set()
        for pool in pools:
            pool_roles.update(self.roles(authid, f"/pool/{pool}"))
        if NO_ACCESS in pool_roles:
            return {NO_ACCESS: False}
        merged = dict(roles)
        for role in pool_roles:
            merged.setdefault(role, False)
        return merged

    # Reports --------------------------------------------------------------------------------

    def effective_permissions(
        self, authid: str, path: str | None = None
    ) -> dict[str, dict[str, bool]]:
        """GET /access/permissions: every path with privileges, each privilege's propagation."""
        if path is not None:
            decision = self._decide(authid, path, None)
            return {path: dict(decision.propagate)}
        paths = set(_DEFAULT_PATHS) | set(self.levels) | set(self.pools_of)
        report = {}
        for candidate in sorted(paths):
            decision = self._decide(authid, candidate, None)
            if decision.privileges:
                report[candidate] = dict(decision.propagate)
        return report

    def capabilities(self, authid: str) -> dict[str, dict[str, int]]:
        """The ticket reply's ``cap``: privileges per area of the API, for the web UI."""
        caps: dict[str, dict[str, int]] = {area: {} for area in _CAP_PRIVS}
        for path in dict.fromkeys([*_CAP_PATHS, *sorted(self.levels)]):
            held = self._decide(authid, path, None).privileges
            top = path.split("/")[1] if path != "/" else "dc"
            if top == "pool":
                for priv in held:
                    if priv.startswith("VM."):
                        caps["vms"][priv] = 1
                    elif priv.startswith("Datastore."):
                        caps["storage"][priv] = 1
                    elif priv == "Permissions.Modify":
                        caps["storage"][priv] = caps["vms"][priv] = 1
                continue
            pattern = _CAP_PRIVS.get(top or "dc")
            if pattern is None:
                continue
            for priv in held:
                if pattern.match(priv):
                    caps[top or "dc"][priv] = 1
        return caps

    def members(self, groupid: str) -> tuple[str, ...]:
        """The users in ``groupid``, sorted."""
        return tuple(sorted(user for user, groups in self.memberships.items() if groupid in groups))
