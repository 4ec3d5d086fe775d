"""Users, groups, passwords and API tokens, and the password re-check before changing a user."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from rucher.bus import RucherError
from rucher.iam.context import Context, change, exists, invalid, not_found
from rucher.iam.realms.interface import PasswordRealm
from rucher.iam.realms.pve import hash_password
from rucher.proto.common import ChangeKind, Done
from rucher.proto.errors import ErrorCode
from rucher.proto.iam import (
    ACL_CHANGED,
    GROUP_CHANGED,
    PASSWORD_CHANGED,
    TOKEN_CHANGED,
    USER_CHANGED,
    AclChanged,
    GroupChanged,
    GroupCreate,
    GroupDelete,
    GroupList,
    GroupListQuery,
    GroupUpdate,
    PasswordChange,
    PasswordChanged,
    TokenChanged,
    TokenCreate,
    TokenCreated,
    TokenDelete,
    TokenList,
    TokenListQuery,
    TokenUpdate,
    UserChanged,
    UserCreate,
    UserDelete,
    UserList,
    UserListQuery,
    UserUpdate,
)
from rucher.proto.iam_state import (
    ACL,
    TOKENS,
    USERS,
    AclRecord,
    AclSubjectType,
    GroupInfo,
    GroupRecord,
    RealmType,
    TokenInfo,
    TokenRecord,
    UserInfo,
    UserRecord,
    acl_key,
    domain_key,
    group_key,
    token_key,
    user_key,
)
from rucher.proto.keys import encode_token
from rucher.pve.roles import ROOT_USER
from rucher.pve.tokens import hash_secret, new_secret

MIN_PASSWORD = 8


def token_info(record: TokenRecord) -> TokenInfo:
    """A token without its secret."""
    return TokenInfo(
        tokenid=record.tokenid,
        privsep=record.privsep,
        expire=record.expire,
        comment=record.comment,
    )


class Accounts:
    """Create, change and delete users, groups and tokens."""

    def __init__(self, context: Context, realms: dict[RealmType, PasswordRealm]) -> None:
        self.ctx = context
        self.realms = realms

    # Checks ---------------------------------------------------------------------------------

    async def realm_type(self, userid: str, field: str = "userid") -> RealmType:
        """The type of the realm ``userid`` belongs to; ``invalid`` if there is no such realm."""
        realm = userid.rsplit("@", 1)[-1]
        entry = await self.ctx.tables.domains.get(domain_key(realm))
        if entry is None or entry.value is None:
            raise invalid(field, f"authentication domain '{realm}' does not exist")
        return entry.value.type

    async def _check_groups(self, groups: tuple[str, ...]) -> None:
        for group in groups:
            if await self.ctx.tables.groups.get(group_key(group)) is None:
                raise invalid("groups", f"group '{group}' does not exist")

    @staticmethod
    def _check_password(password: str, field: str = "password") -> None:
        if len(password) < MIN_PASSWORD:
            raise invalid(field, f"the password must be at least {MIN_PASSWORD} characters")

    @staticmethod
    def _check_expire(expire: int | None) -> None:
        if expire is not None and expire < 0:
            raise invalid("expire", "expire must be 0 (never) or a Unix time")

    async def user(self, userid: str) -> UserRecord:
        """A user's record; ``not_found`` (field userid) if there is none."""
        entry = await self.ctx.tables.users.get(user_key(userid))
        if entry is None or entry.value is None:
            raise not_found("userid", f"no such user ('{userid}')")
        return entry.value

    async def reauthenticate(
        self, actor: str, userid: str, password: str | None, field: str = "password"
    ) -> None:
        """Check Proxmox's ``reauth_user_for_user_modification`` before changing ``userid``.

        Only root@pam modifies root@pam; everyone else confirms with their own current password
        (in ``field``), checked by their own realm, so a stolen ticket alone cannot change a
        victim's password or second factors.
        """
        await self.user(userid)
        if actor == ROOT_USER:
            return
        if userid == ROOT_USER:
            raise RucherError(
                ErrorCode.FORBIDDEN,
                "only root@pam may modify root@pam",
                details={"field": "userid"},
            )
        if password is None:
            raise invalid(field, "password is required to modify user")
        actor_user = actor.split("!", 1)[0]
        record = await self.user(actor_user)
        realm = self.realms.get(await self.realm_type(actor_user, field))
        if realm is None:
            raise invalid(field, f"the realm of '{actor_user}' does not check passwords")
        if not await realm.authenticate(record, password):
            raise invalid(field, "the password is wrong")

    # Users ----------------------------------------------------------------------------------

    async def create_user(self, command: UserCreate) -> Done:
        """Create a user; a password only in a pve realm."""
        kind = await self.realm_type(command.userid)
        self._check_expire(command.expire)
        await self._check_groups(command.groups)
        password_hash = ""
        if command.password is not None:
            if kind is not RealmType.PVE:
                raise invalid("password", "a password can only be set for pve realm users")
            self._check_password(command.password)
            password_hash = await asyncio.to_thread(hash_password, command.password)
        record = UserRecord(
            userid=command.userid,
            enable=command.enable,
            expire=command.expire,
            firstname=command.firstname,
            lastname=command.lastname,
            email=command.email,
            comment=command.comment,
            groups=tuple(dict.fromkeys(command.groups)),
            keys=command.keys,
            password_hash=password_hash,
            created=time.time(),
        )
        try:
            await self.ctx.tables.users.create(user_key(command.userid), record)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                raise exists("userid", f"user '{command.userid}' already exists") from err
            raise
        await self.user_changed(command.userid, ChangeKind.CREATED, command.actor, ())
        return Done()

    async def update_user(self, command: UserUpdate) -> Done:
        """Change the fields given; ``append`` adds ``groups`` instead of replacing them."""
        self._check_expire(command.expire)
        if command.groups is not None:
            await self._check_groups(command.groups)
        changes = {
            name: getattr(command, name)
            for name in ("enable", "expire", "firstname", "lastname", "email", "comment", "keys")
            if getattr(command, name) is not None
        }

        def edit(user: UserRecord) -> UserRecord:
            fields = dict(changes)
            if command.groups is not None:
                base = user.groups if command.append else ()
                fields["groups"] = tuple(dict.fromkeys((*base, *command.groups)))
            return msgspec.structs.replace(user, **fields)

        missing = not_found("userid", f"no such user ('{command.userid}')")
        old, new = await change(self.ctx.tables.users, user_key(command.userid), edit, missing)
        changed = tuple(
            name for name in msgspec.structs.asdict(new) if getattr(old, name) != getattr(new, name)
        )
        await self.user_changed(command.userid, ChangeKind.UPDATED, command.actor, changed)
        return Done()

    async def delete_user(self, command: UserDelete) -> Done:
        """Delete a user with its tokens and every ACL entry naming it or its tokens."""
        if command.userid == ROOT_USER:
            raise invalid("userid", "root@pam cannot be deleted")
        entry = await self.ctx.tables.users.get(user_key(command.userid))
        if entry is None:
            raise not_found("userid", f"no such user ('{command.userid}')")
        pattern = f"{TOKENS}.{encode_token(command.userid)}.*"
        for stored in await self.ctx.tables.tokens.entries(pattern):
            if stored.value is not None:
                await self.ctx.tables.tokens.delete(stored.key)
                await self._token_changed(stored.value, ChangeKind.DELETED, command.actor)
        await self.drop_acl(
            lambda e: e.ugid == command.userid or e.ugid.startswith(command.userid + "!"),
            command.actor,
        )
        await self.ctx.tables.users.delete(user_key(command.userid), revision=entry.revision)
        await self.user_changed(command.userid, ChangeKind.DELETED, command.actor, ())
        return Done()

    def list_users(self, query: UserListQuery) -> UserList:
        """Every user without secrets; ``full`` adds their tokens."""
        state = self.ctx.view.state
        kinds = {realm.realm: realm.type for realm in state.domains.values()}
        tokens: dict[str, list[TokenInfo]] = {}
        for token in state.tokens.values():
            tokens.setdefault(token.tokenid.split("!", 1)[0], []).append(token_info(token))
        users = []
        for user in sorted(state.users.values(), key=lambda u: u.userid):
            if query.enabled is not None and user.enable != query.enabled:
                continue
            users.append(
                UserInfo(
                    userid=user.userid,
                    enable=user.enable,
                    expire=user.expire,
                    firstname=user.firstname,
                    lastname=user.lastname,
                    email=user.email,
                    comment=user.comment,
                    groups=user.groups,
                    keys=user.keys,
                    realm_type=kinds.get(user.userid.rsplit("@", 1)[-1]),
                    tfa=("totp",) if any(entry.enable for entry in user.totp) else (),
                    tokens=tuple(tokens.get(user.userid, ())) if query.full else (),
                )
            )
        return UserList(users=tuple(users))

    async def change_password(self, command: PasswordChange) -> Done:
        """Set a pve user's password, once the actor confirmed with their own (but root@pam)."""
        await self.reauthenticate(
            command.actor, command.userid, command.confirmation_password, "confirmation-password"
        )
        if await self.realm_type(command.userid) is not RealmType.PVE:
            raise RucherError(
                ErrorCode.UNSUPPORTED,
                "only pve realm passwords can be changed here",
                details={"field": "userid"},
            )
        self._check_password(command.password)
        password_hash = await asyncio.to_thread(hash_password, command.password)
        missing = not_found("userid", f"no such user ('{command.userid}')")
        await change(
            self.ctx.tables.users,
            user_key(command.userid),
            lambda user: msgspec.structs.replace(user, password_hash=password_hash),
            missing,
        )
        event = PasswordChanged(userid=command.userid, actor=command.actor, **self.ctx.meta())
        await self.ctx.audit.emit(PASSWORD_CHANGED, event)
        return Done()

    # Groups ---------------------------------------------------------------------------------

    async def create_group(self, command: GroupCreate) -> Done:
        """Create an empty group."""
        record = GroupRecord(groupid=command.groupid, comment=command.comment)
        try:
            await self.ctx.tables.groups.create(group_key(command.groupid), record)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                raise exists("groupid", f"group '{command.groupid}' already exists") from err
            raise
        await self._group_changed(command.groupid, ChangeKind.CREATED, command.actor)
        return Done()

    async def update_group(self, command: GroupUpdate) -> Done:
        """Change a group's comment."""
        missing = not_found("groupid", f"group '{command.groupid}' does not exist")
        await change(
            self.ctx.tables.groups,
            group_key(command.groupid),
            lambda group: msgspec.structs.replace(group, comment=command.comment),
            missing,
        )
        await self._group_changed(command.groupid, ChangeKind.UPDATED, command.actor)
        return Done()

    async def delete_group(self, command: GroupDelete) -> Done:
        """Delete a group: members leave it, its ACL entries go."""
        entry = await self.ctx.tables.groups.get(group_key(command.groupid))
        if entry is None:
            raise not_found("groupid", f"group '{command.groupid}' does not exist")
        for stored in await self.ctx.tables.users.entries(f"{USERS}.*"):
            user = stored.value
            if user is not None and command.groupid in user.groups:
                await change(
                    self.ctx.tables.users,
                    user_key(user.userid),
                    lambda u: msgspec.structs.replace(
                        u, groups=tuple(g for g in u.groups if g != command.groupid)
                    ),
                    not_found("userid", f"no such user ('{user.userid}')"),
                )
        await self.drop_acl(
            lambda e: e.type is AclSubjectType.GROUP and e.ugid == command.groupid, command.actor
        )
        await self.ctx.tables.groups.delete(group_key(command.groupid))
        await self._group_changed(command.groupid, ChangeKind.DELETED, command.actor)
        return Done()

    def list_groups(self, _query: GroupListQuery) -> GroupList:
        """Every group with its members."""
        state = self.ctx.view.state
        groups = [
            GroupInfo(
                groupid=group.groupid,
                comment=group.comment,
                members=tuple(
                    sorted(u.userid for u in state.users.values() if group.groupid in u.groups)
                ),
            )
            for group in sorted(state.groups.values(), key=lambda g: g.groupid)
        ]
        return GroupList(groups=tuple(groups))

    # Tokens ---------------------------------------------------------------------------------

    async def create_token(self, command: TokenCreate) -> TokenCreated:
        """Create a token; its secret is in the reply and nowhere else."""
        await self.user(command.userid)
        self._check_expire(command.expire)
        tokenid = f"{command.userid}!{command.tokenid}"
        secret = new_secret()
        record = TokenRecord(
            tokenid=tokenid,
            privsep=command.privsep,
            expire=command.expire,
            comment=command.comment,
            secret_hash=hash_secret(secret),
        )
        try:
            await self.ctx.tables.tokens.create(token_key(command.userid, command.tokenid), record)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                raise exists("tokenid", f"token '{tokenid}' already exists") from err
            raise
        await self._token_changed(record, ChangeKind.CREATED, command.actor)
        return TokenCreated(full_tokenid=tokenid, info=token_info(record), value=secret)

    async def update_token(self, command: TokenUpdate) -> Done:
        """Change a token's privilege separation, expiry or comment."""
        self._check_expire(command.expire)
        changes = {
            name: getattr(command, name)
            for name in ("privsep", "expire", "comment")
            if getattr(command, name) is not None
        }
        tokenid = f"{command.userid}!{command.tokenid}"
        _, new = await change(
            self.ctx.tables.tokens,
            token_key(command.userid, command.tokenid),
            lambda token: msgspec.structs.replace(token, **changes),
            not_found("tokenid", f"no such token '{tokenid}'"),
        )
        await self._token_changed(new, ChangeKind.UPDATED, command.actor)
        return Done()

    async def delete_token(self, command: TokenDelete) -> Done:
        """Delete a token and its ACL entries."""
        tokenid = f"{command.userid}!{command.tokenid}"
        key = token_key(command.userid, command.tokenid)
        entry = await self.ctx.tables.tokens.get(key)
        if entry is None or entry.value is None:
            raise not_found("tokenid", f"no such token '{tokenid}'")
        await self.drop_acl(
            lambda e: e.type is AclSubjectType.TOKEN and e.ugid == tokenid, command.actor
        )
        await self.ctx.tables.tokens.delete(key)
        await self._token_changed(entry.value, ChangeKind.DELETED, command.actor)
        return Done()

    def list_tokens(self, query: TokenListQuery) -> TokenList:
        """A user's tokens."""
        if query.userid not in self.ctx.view.index.users:
            raise not_found("userid", f"no such user ('{query.userid}')")
        tokens = sorted(
            (
                token_info(token)
                for token in self.ctx.view.state.tokens.values()
                if token.tokenid.split("!", 1)[0] == query.userid
            ),
            key=lambda info: info.tokenid,
        )
        return TokenList(tokens=tuple(tokens))

    # Shared ---------------------------------------------------------------------------------

    async def drop_acl(self, matches: Callable[[AclRecord], bool], actor: str) -> None:
        """Delete every ACL entry ``matches(entry)`` selects, each with its event."""
        for stored in await self.ctx.tables.acl.entries(f"{ACL}.>"):
            entry = stored.value
            if entry is not None and matches(entry):
                await self.ctx.tables.acl.delete(acl_key(entry))
                await self.acl_changed(entry, ChangeKind.DELETED, actor)

    async def acl_changed(self, entry: AclRecord, kind: ChangeKind, actor: str) -> None:
        """Record an ACL change."""
        event = AclChanged(
            path=entry.path,
            ugid=entry.ugid,
            ugid_type=entry.type,
            roleid=entry.roleid,
            propagate=entry.propagate,
            change=kind,
            actor=actor,
            **self.ctx.meta(),
        )
        await self.ctx.audit.emit(ACL_CHANGED, event)

    async def user_changed(
        self, userid: str, kind: ChangeKind, actor: str, fields: tuple[str, ...]
    ) -> None:
        """Record a change to a user (secrets' fields are not named)."""
        event = UserChanged(
            userid=userid,
            change=kind,
            actor=actor,
            fields=tuple(f for f in fields if f not in ("password_hash", "totp_last_step")),
            **self.ctx.meta(),
        )
        await self.ctx.audit.emit(USER_CHANGED, event)

    async def _group_changed(self, groupid: str, kind: ChangeKind, actor: str) -> None:
        event = GroupChanged(groupid=groupid, change=kind, actor=actor, **self.ctx.meta())
        await self.ctx.audit.emit(GROUP_CHANGED, event)

    async def _token_changed(self, token: TokenRecord, kind: ChangeKind, actor: str) -> None:
        event = TokenChanged(
            tokenid=token.tokenid,
            change=kind,
            actor=actor,
            privsep=token.privsep,
            expire=token.expire or None,
            **self.ctx.meta(),
        )
        await self.ctx.audit.emit(TOKEN_CHANGED, event)
