"""Second factors: add, change, remove and list users' TOTP factors, and check their codes."""

from __future__ import annotations

import secrets
import time

import msgspec

from rucher.bus import RucherError
from rucher.iam.accounts import Accounts
from rucher.iam.context import Context, change, invalid, not_found
from rucher.proto.common import ChangeKind, Done
from rucher.proto.errors import ErrorCode
from rucher.proto.iam import (
    TfaAdd,
    TfaAdded,
    TfaDelete,
    TfaList,
    TfaListQuery,
    TfaUpdate,
    TfaVerify,
)
from rucher.proto.iam_state import TfaEntryInfo, TotpEntry, UserRecord, user_key
from rucher.pve import totp


class SecondFactors:
    """Users' TOTP factors: changed with Proxmox's re-authentication, consumed at login."""

    def __init__(self, context: Context, accounts: Accounts) -> None:
        self.ctx = context
        self.accounts = accounts

    async def add_tfa(self, command: TfaAdd) -> TfaAdded:
        """Add a TOTP factor once a current code proves the authenticator holds it."""
        await self.accounts.reauthenticate(command.actor, command.userid, command.password)
        try:
            spec = totp.parse_uri(command.totp)
        except totp.TotpError as err:
            raise invalid("totp", f"invalid TOTP URI: {err}") from err
        if totp.verify(spec, command.value, time.time()) is None:
            raise invalid("value", "the TOTP code does not match the secret")
        entry = TotpEntry(
            id=secrets.token_hex(8),
            secret=spec.secret,
            description=command.description,
            created=time.time(),
            digits=spec.digits,
            period=spec.period,
        )
        await change(
            self.ctx.tables.users,
            user_key(command.userid),
            lambda user: msgspec.structs.replace(user, totp=(*user.totp, entry)),
            not_found("userid", f"no such user ('{command.userid}')"),
        )
        await self._factors_changed(command.userid, command.actor)
        return TfaAdded(id=entry.id)

    async def delete_tfa(self, command: TfaDelete) -> Done:
        """Remove one factor (after the same re-authentication as Proxmox's DELETE)."""
        await self.accounts.reauthenticate(command.actor, command.userid, command.password)
        user = await self.accounts.user(command.userid)
        if not any(entry.id == command.id for entry in user.totp):
            raise not_found("id", f"user '{command.userid}' has no second factor '{command.id}'")
        await change(
            self.ctx.tables.users,
            user_key(command.userid),
            lambda u: msgspec.structs.replace(
                u, totp=tuple(e for e in u.totp if e.id != command.id)
            ),
            not_found("userid", f"no such user ('{command.userid}')"),
        )
        await self._factors_changed(command.userid, command.actor)
        return Done()

    async def update_tfa(self, command: TfaUpdate) -> Done:
        """Change one factor's description or whether it counts at login (as Proxmox's PUT)."""
        await self.accounts.reauthenticate(command.actor, command.userid, command.password)
        changes = {
            name: getattr(command, name)
            for name in ("description", "enable")
            if getattr(command, name) is not None
        }

        def edit(user: UserRecord) -> UserRecord:
            # Checked on the record being replaced, so a concurrent delete cannot slip between.
            if not any(entry.id == command.id for entry in user.totp):
                raise not_found(
                    "id", f"user '{command.userid}' has no second factor '{command.id}'"
                )
            factors = tuple(
                msgspec.structs.replace(entry, **changes) if entry.id == command.id else entry
                for entry in user.totp
            )
            return msgspec.structs.replace(user, totp=factors)

        missing = not_found("userid", f"no such user ('{command.userid}')")
        await change(self.ctx.tables.users, user_key(command.userid), edit, missing)
        await self._factors_changed(command.userid, command.actor)
        return Done()

    async def verify_tfa(self, command: TfaVerify) -> Done:
        """Accept a current TOTP code once; ``unauthenticated`` otherwise."""
        if not await self.consume_totp(command.userid, command.code):
            raise RucherError(ErrorCode.UNAUTHENTICATED, "second factor refused")
        return Done()

    async def consume_totp(self, userid: str, code: str) -> bool:
        """Whether ``code`` is a fresh code of one of the user's factors (then it is used up)."""
        for _ in range(5):
            entry = await self.ctx.tables.users.get(user_key(userid))
            if entry is None or entry.value is None:
                return False
            user = entry.value
            now = time.time()
            steps = [
                totp.verify(
                    totp.TotpSpec(secret=f.secret, digits=f.digits, period=f.period),
                    code,
                    now,
                    after_step=user.totp_last_step,
                )
                for f in user.totp
                if f.enable
            ]
            matched = max((step for step in steps if step is not None), default=None)
            if matched is None:
                return False
            try:
                await self.ctx.tables.users.update(
                    user_key(userid),
                    msgspec.structs.replace(user, totp_last_step=matched),
                    revision=entry.revision,
                )
            except RucherError as err:
                if err.code is ErrorCode.CONFLICT:
                    continue
                raise
            return True
        return False

    def list_tfa(self, query: TfaListQuery) -> TfaList:
        """Second factors of one user or of all."""
        users = self.ctx.view.state.users.values()
        entries = [
            TfaEntryInfo(
                userid=user.userid,
                id=factor.id,
                description=factor.description,
                created=factor.created,
                enable=factor.enable,
            )
            for user in sorted(users, key=lambda u: u.userid)
            if query.userid in (None, user.userid)
            for factor in user.totp
        ]
        return TfaList(entries=tuple(entries))

    async def _factors_changed(self, userid: str, actor: str) -> None:
        await self.accounts.user_changed(userid, ChangeKind.UPDATED, actor, ("tfa",))
