"""Roles, ACL entries, resource pools and authentication realms."""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec

from rucher.bus import RucherError
from rucher.iam.accounts import Accounts
from rucher.iam.context import Context, change, exists, invalid, not_found
from rucher.iam.realms.openid import is_keycloak_issuer
from rucher.proto.common import ChangeKind, Done
from rucher.proto.errors import ErrorCode
from rucher.proto.iam import (
    POOL_CHANGED,
    REALM_CHANGED,
    ROLE_CHANGED,
    AclList,
    AclListQuery,
    AclUpdate,
    DomainCreate,
    DomainDelete,
    DomainList,
    DomainListQuery,
    DomainUpdate,
    PoolChanged,
    PoolCreate,
    PoolDelete,
    PoolList,
    PoolListQuery,
    PoolUpdate,
    RealmChanged,
    RoleChanged,
    RoleCreate,
    RoleDelete,
    RoleList,
    RoleListQuery,
    RoleUpdate,
)
from rucher.proto.iam_state import (
    AclRecord,
    AclSubjectType,
    PoolRecord,
    RealmInfo,
    RealmRecord,
    RealmType,
    RoleInfo,
    RoleRecord,
    acl_key,
    domain_key,
    group_key,
    pool_key,
    role_key,
    token_key,
    user_key,
)
from rucher.pve.acl import normalize_path
from rucher.pve.roles import BUILTIN_ROLES, invalid_privileges, is_builtin_role

# The paths an ACL entry may name (PVE::AccessControl::check_path, plus Rucher's mappings).
_ACL_PATH = re.compile(
    r"^(/|/access|/access/groups|/access/groups/[\w.-]+|/access/realm|/access/realm/[\w.-]+"
    r"|/mapping|/mapping/[\w.-]+|/mapping/[\w.-]+/[\w.-]+|/nodes|/nodes/[\w.-]+"
    r"|/pool|/pool/[\w.-]+(/[\w.-]+){0,2}|/sdn|/sdn/zones|/sdn/zones/[\w.-]+"
    r"|/sdn/zones/[\w.-]+/[\w.-]+|/sdn/zones/[\w.-]+/[\w.-]+/[1-9][0-9]{0,3}"
    r"|/storage|/storage/[\w.-]+|/vms|/vms/[1-9][0-9]{2,8})$"
)
_REALM_OPTIONS = {
    RealmType.PAM: {"comment", "default"},
    RealmType.PVE: {"comment", "default"},
    RealmType.OPENID: {
        name for name in RealmRecord.__struct_fields__ if name not in ("realm", "type")
    },
}
_DEFAULTS = RealmRecord(realm="x", type=RealmType.OPENID)


def _without(vmids: set[int]) -> Callable[[PoolRecord], PoolRecord]:
    def edit(pool: PoolRecord) -> PoolRecord:
        return msgspec.structs.replace(pool, vms=tuple(v for v in pool.vms if v not in vmids))

    return edit


def realm_info(realm: RealmRecord) -> RealmInfo:
    """A realm without its client secret."""
    fields = msgspec.structs.asdict(realm)
    fields.pop("client_key")
    return RealmInfo(**fields)


class Access:
    """Who may do what: roles, ACL entries, pools, and the realms users come from."""

    def __init__(self, context: Context, accounts: Accounts) -> None:
        self.ctx = context
        self.accounts = accounts

    # Roles ----------------------------------------------------------------------------------

    @staticmethod
    def _check_privs(privs: tuple[str, ...]) -> None:
        unknown = invalid_privileges(privs)
        if unknown:
            raise invalid("privs", f"invalid privilege '{unknown[0]}'")

    async def create_role(self, command: RoleCreate) -> Done:
        """Create a custom role."""
        if is_builtin_role(command.roleid):
            raise exists("roleid", f"role '{command.roleid}' already exists")
        self._check_privs(command.privs)
        record = RoleRecord(roleid=command.roleid, privs=tuple(sorted(set(command.privs))))
        try:
            await self.ctx.tables.roles.create(role_key(command.roleid), record)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                raise exists("roleid", f"role '{command.roleid}' already exists") from err
            raise
        await self._role_changed(record, ChangeKind.CREATED, command.actor)
        return Done()

    async def update_role(self, command: RoleUpdate) -> Done:
        """Replace (or with ``append`` extend) a custom role's privileges."""
        if is_builtin_role(command.roleid):
            raise invalid("roleid", f"cannot change built-in role '{command.roleid}'")
        self._check_privs(command.privs)

        def edit(role: RoleRecord) -> RoleRecord:
            privs = {*role.privs, *command.privs} if command.append else set(command.privs)
            return msgspec.structs.replace(role, privs=tuple(sorted(privs)))

        missing = not_found("roleid", f"role '{command.roleid}' does not exist")
        _, new = await change(self.ctx.tables.roles, role_key(command.roleid), edit, missing)
        await self._role_changed(new, ChangeKind.UPDATED, command.actor)
        return Done()

    async def delete_role(self, command: RoleDelete) -> Done:
        """Delete a custom role and every ACL entry granting it."""
        if is_builtin_role(command.roleid):
            raise invalid("roleid", f"cannot delete built-in role '{command.roleid}'")
        entry = await self.ctx.tables.roles.get(role_key(command.roleid))
        if entry is None or entry.value is None:
            raise not_found("roleid", f"role '{command.roleid}' does not exist")
        await self.accounts.drop_acl(lambda e: e.roleid == command.roleid, command.actor)
        await self.ctx.tables.roles.delete(role_key(command.roleid))
        await self._role_changed(entry.value, ChangeKind.DELETED, command.actor)
        return Done()

    def list_roles(self, _query: RoleListQuery) -> RoleList:
        """Built-in roles, then custom ones."""
        roles = [
            RoleInfo(roleid=name, privs=tuple(sorted(privs)), special=True)
            for name, privs in BUILTIN_ROLES.items()
        ] + [
            RoleInfo(roleid=role.roleid, privs=role.privs)
            for role in sorted(self.ctx.view.state.roles.values(), key=lambda r: r.roleid)
        ]
        return RoleList(roles=tuple(roles))

    async def _role_changed(self, role: RoleRecord, kind: ChangeKind, actor: str) -> None:
        event = RoleChanged(
            roleid=role.roleid, change=kind, actor=actor, privileges=role.privs, **self.ctx.meta()
        )
        await self.ctx.audit.emit(ROLE_CHANGED, event)

    # ACL ------------------------------------------------------------------------------------

    async def update_acl(self, command: AclUpdate) -> Done:
        """Grant ``roles`` on ``path`` to every user, group and token named (or revoke them)."""
        path = normalize_path(command.path)
        if path is None or not _ACL_PATH.match(path):
            raise invalid("path", f"invalid ACL path '{command.path}'")
        if not command.roles:
            raise invalid("roles", "no role given")
        if not (command.users or command.groups or command.tokens):
            raise invalid("users", "no user, group or token given")
        subjects = [
            *[(AclSubjectType.USER, name, "users") for name in command.users],
            *[(AclSubjectType.GROUP, name, "groups") for name in command.groups],
            *[(AclSubjectType.TOKEN, name, "tokens") for name in command.tokens],
        ]
        if not command.delete:
            for roleid in command.roles:
                if (
                    not is_builtin_role(roleid)
                    and await self.ctx.tables.roles.get(role_key(roleid)) is None
                ):
                    raise invalid("roles", f"role '{roleid}' does not exist")
            for kind, name, field in subjects:
                await self._check_subject(kind, name, field)
        for kind, name, _ in subjects:
            for roleid in command.roles:
                entry = AclRecord(
                    path=path, ugid=name, type=kind, roleid=roleid, propagate=command.propagate
                )
                if command.delete:
                    if acl_key(entry) not in self.ctx.view.state.acl and (
                        await self.ctx.tables.acl.get(acl_key(entry)) is None
                    ):
                        continue
                    await self.ctx.tables.acl.delete(acl_key(entry))
                    await self.accounts.acl_changed(entry, ChangeKind.DELETED, command.actor)
                else:
                    await self.ctx.tables.acl.put(acl_key(entry), entry)
                    await self.accounts.acl_changed(entry, ChangeKind.UPDATED, command.actor)
        return Done()

    async def _check_subject(self, kind: AclSubjectType, name: str, field: str) -> None:
        found: object
        if kind is AclSubjectType.USER:
            found = await self.ctx.tables.users.get(user_key(name))
            what = f"user '{name}'"
        elif kind is AclSubjectType.GROUP:
            found = await self.ctx.tables.groups.get(group_key(name))
            what = f"group '{name}'"
        else:
            user, bang, token = name.partition("!")
            found = await self.ctx.tables.tokens.get(token_key(user, token)) if bang else None
            what = f"token '{name}'"
        if found is None:
            raise invalid(field, f"{what} does not exist")

    def list_acl(self, _query: AclListQuery) -> AclList:
        """Every ACL entry, by path."""
        entries = sorted(
            self.ctx.view.state.acl.values(), key=lambda e: (e.path, e.type, e.ugid, e.roleid)
        )
        return AclList(entries=tuple(entries))

    # Pools ----------------------------------------------------------------------------------

    async def create_pool(self, command: PoolCreate) -> Done:
        """Create an empty pool."""
        record = PoolRecord(poolid=command.poolid, comment=command.comment)
        try:
            await self.ctx.tables.pools.create(pool_key(command.poolid), record)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                raise exists("poolid", f"pool '{command.poolid}' already exists") from err
            raise
        await self._pool_changed(command.poolid, ChangeKind.CREATED, command.actor)
        return Done()

    async def update_pool(self, command: PoolUpdate) -> Done:
        """Change the comment; add (or with ``delete`` remove) guests and storages."""
        if not command.delete:
            for other in self.ctx.view.state.pools.values():
                moved = set(command.vms) & set(other.vms)
                if other.poolid == command.poolid or not moved:
                    continue
                if not command.allow_move:
                    vmid = min(moved)
                    raise invalid("vms", f"VM {vmid} belongs to pool '{other.poolid}'")
                await change(
                    self.ctx.tables.pools,
                    pool_key(other.poolid),
                    _without(moved),
                    not_found("poolid", f"pool '{other.poolid}' does not exist"),
                )

        def edit(pool: PoolRecord) -> PoolRecord:
            if command.delete:
                vms = tuple(v for v in pool.vms if v not in command.vms)
                storage = tuple(s for s in pool.storage if s not in command.storage)
            else:
                vms = tuple(sorted({*pool.vms, *command.vms}))
                storage = tuple(sorted({*pool.storage, *command.storage}))
            comment = pool.comment if command.comment is None else command.comment
            return msgspec.structs.replace(pool, vms=vms, storage=storage, comment=comment)

        missing = not_found("poolid", f"pool '{command.poolid}' does not exist")
        await change(self.ctx.tables.pools, pool_key(command.poolid), edit, missing)
        await self._pool_changed(command.poolid, ChangeKind.UPDATED, command.actor)
        return Done()

    async def delete_pool(self, command: PoolDelete) -> Done:
        """Delete an empty pool and the ACL entries on it."""
        entry = await self.ctx.tables.pools.get(pool_key(command.poolid))
        if entry is None or entry.value is None:
            raise not_found("poolid", f"pool '{command.poolid}' does not exist")
        if entry.value.vms or entry.value.storage:
            raise invalid("poolid", f"pool '{command.poolid}' is not empty")
        prefix = f"/pool/{command.poolid}"
        await self.accounts.drop_acl(
            lambda e: e.path == prefix or e.path.startswith(prefix + "/"), command.actor
        )
        await self.ctx.tables.pools.delete(pool_key(command.poolid), revision=entry.revision)
        await self._pool_changed(command.poolid, ChangeKind.DELETED, command.actor)
        return Done()

    def list_pools(self, _query: PoolListQuery) -> PoolList:
        """Every pool with its members."""
        pools = sorted(self.ctx.view.state.pools.values(), key=lambda pool: pool.poolid)
        return PoolList(pools=tuple(pools))

    async def _pool_changed(self, poolid: str, kind: ChangeKind, actor: str) -> None:
        event = PoolChanged(poolid=poolid, change=kind, actor=actor, **self.ctx.meta())
        await self.ctx.audit.emit(POOL_CHANGED, event)

    # Realms ---------------------------------------------------------------------------------

    @staticmethod
    def _check_realm(realm: RealmRecord) -> None:
        if realm.type is RealmType.OPENID:
            if not realm.issuer_url.startswith(("https://", "http://")):
                raise invalid("issuer-url", "the issuer URL must be an http(s) URL")
            if not realm.client_id:
                raise invalid("client-id", "an openid realm needs a client id")
            if is_keycloak_issuer(realm.issuer_url) and realm.issuer_url.endswith("/"):
                raise invalid("issuer-url", "a Keycloak issuer URL ends with the realm name")

    async def create_domain(self, command: DomainCreate) -> Done:
        """Add a realm (there is one pam and one pve realm, made at bootstrap)."""
        realm = command.config
        if realm.type is not RealmType.OPENID:
            raise invalid("type", f"only openid realms can be added, not '{realm.type}'")
        self._check_realm(realm)
        try:
            await self.ctx.tables.domains.create(domain_key(realm.realm), realm)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                raise exists("realm", f"domain '{realm.realm}' already exists") from err
            raise
        await self._realm_changed(realm.realm, ChangeKind.CREATED, command.actor)
        return Done()

    async def update_domain(self, command: DomainUpdate) -> Done:
        """Set the options in ``changes`` and reset those in ``delete``."""

        def edit(realm: RealmRecord) -> RealmRecord:
            allowed = _REALM_OPTIONS[realm.type]
            fields: dict[str, object] = {}
            for name in command.delete:
                if name not in allowed:
                    raise invalid("delete", f"option '{name}' cannot be reset on this realm")
                fields[name] = getattr(_DEFAULTS, name)
            for name, value in command.changes.items():
                if name not in allowed:
                    raise invalid(name.replace("_", "-"), f"option '{name}' is not valid here")
                if type(value) is not type(getattr(_DEFAULTS, name)):
                    raise invalid(name.replace("_", "-"), f"option '{name}' has the wrong type")
                fields[name] = value
            updated = msgspec.structs.replace(realm, **fields)
            self._check_realm(updated)
            return updated

        missing = not_found("realm", f"domain '{command.realm}' does not exist")
        await change(self.ctx.tables.domains, domain_key(command.realm), edit, missing)
        await self._realm_changed(command.realm, ChangeKind.UPDATED, command.actor)
        return Done()

    async def delete_domain(self, command: DomainDelete) -> Done:
        """Remove an openid realm (its users stay, unable to log in)."""
        entry = await self.ctx.tables.domains.get(domain_key(command.realm))
        if entry is None or entry.value is None:
            raise not_found("realm", f"domain '{command.realm}' does not exist")
        if entry.value.type is not RealmType.OPENID:
            raise invalid("realm", f"cannot remove the built-in realm '{command.realm}'")
        await self.ctx.tables.domains.delete(domain_key(command.realm))
        await self._realm_changed(command.realm, ChangeKind.DELETED, command.actor)
        return Done()

    def list_domains(self, _query: DomainListQuery) -> DomainList:
        """Every realm, without client secrets."""
        realms = sorted(self.ctx.view.state.domains.values(), key=lambda r: r.realm)
        return DomainList(domains=tuple(realm_info(realm) for realm in realms))

    async def _realm_changed(self, realm: str, kind: ChangeKind, actor: str) -> None:
        event = RealmChanged(realm=realm, change=kind, actor=actor, **self.ctx.meta())
        await self.ctx.audit.emit(REALM_CHANGED, event)
