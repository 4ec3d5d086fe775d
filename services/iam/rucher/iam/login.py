"""Logging in: passwords through realms, ticket renewal, TOTP, OpenID, and slowing attackers.

Every refused login answers the same ``unauthenticated`` error after the same delay (about
2-3 s), whether the user is unknown, disabled or the password wrong; the reason only goes to the
audit trail. Each source's recent failures are counted in the bucket, so every IAM instance
slows a guessing source further (doubling per failure past a threshold, capped).
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import time
from collections.abc import Callable
from typing import NoReturn

import msgspec
import structlog

from rucher.bus import RucherError
from rucher.iam.context import Context, invalid
from rucher.iam.realms.interface import PasswordRealm
from rucher.iam.realms.openid import OpenIdProvider, Pkce, groups_of, username_of
from rucher.iam.tfa import SecondFactors
from rucher.proto.errors import ErrorCode
from rucher.proto.iam import (
    LOGIN_FAILED,
    LOGIN_SUCCEEDED,
    AuthMethod,
    Login,
    LoginFailed,
    LoginFailure,
    LoginGranted,
    LoginSucceeded,
    OpenIdAuthUrl,
    OpenIdAuthUrlIssued,
    OpenIdLogin,
)
from rucher.proto.iam_state import (
    OIDC,
    THROTTLE,
    GroupRecord,
    LoginThrottle,
    OpenIdLoginState,
    RealmRecord,
    RealmType,
    SigningKey,
    UserRecord,
    domain_key,
    group_key,
    user_key,
)
from rucher.proto.keys import make_key
from rucher.pve.ticket import (
    TicketError,
    make_csrf_token,
    make_tfa_challenge,
    make_ticket,
    verify_tfa_challenge,
    verify_ticket,
)

log = structlog.get_logger("rucher.iam.login")

OIDC_STATE_TTL = 600.0
_USERID = re.compile(r"^[^\s:@!/]{1,64}@[A-Za-z][A-Za-z0-9._-]{0,31}$")
_MAX_GROUPS = 64


class LoginRefusedError(Exception):
    """Internal: why a login failed, for the audit trail (the caller never sees it)."""

    def __init__(self, reason: LoginFailure, realm: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.realm = realm


ProviderFactory = Callable[[RealmRecord], OpenIdProvider]


class Authenticator:
    """Issues tickets to callers who prove who they are."""

    def __init__(
        self,
        context: Context,
        factors: SecondFactors,
        realms: dict[RealmType, PasswordRealm],
        providers: ProviderFactory,
    ) -> None:
        self.ctx = context
        self.factors = factors
        self.realms = realms
        self.providers = providers

    # Password, ticket and TFA logins ----------------------------------------------------------

    async def login(self, command: Login) -> LoginGranted:
        """Check the credentials; answer a ticket, a TFA challenge, or a delayed refusal."""
        username = command.username.strip()
        if command.realm and "@" not in username:
            username = f"{username}@{command.realm}"
        method = AuthMethod.PASSWORD
        if not _USERID.match(username):
            refused = LoginRefusedError(LoginFailure.BAD_CREDENTIALS)
            await self._refuse(command.username, method, command.source, refused)
        try:
            if command.tfa_challenge is not None:
                return await self._second_factor(username, command)
            if command.password.startswith("PVE:"):
                method = AuthMethod.TICKET
                return await self._renew(username, command.password, command.source)
            return await self._password(username, command)
        except LoginRefusedError as refused:
            await self._refuse(command.username, method, command.source, refused)

    def _keys(self) -> list[SigningKey | None]:
        keys = self.ctx.view.ticket_keys
        if keys is None:
            raise RucherError(ErrorCode.UNAVAILABLE, "ticket keys are not ready yet")
        return [keys.current, keys.previous]

    async def _user(self, userid: str) -> UserRecord:
        entry = await self.ctx.tables.users.get(user_key(userid))
        if entry is None or entry.value is None:
            raise LoginRefusedError(LoginFailure.BAD_CREDENTIALS)
        user = entry.value
        if not user.enable:
            raise LoginRefusedError(LoginFailure.DISABLED)
        if user.expire and user.expire < time.time():
            raise LoginRefusedError(LoginFailure.EXPIRED)
        return user

    async def _realm(self, userid: str) -> RealmRecord:
        name = userid.rsplit("@", 1)[1]
        entry = await self.ctx.tables.domains.get(domain_key(name))
        if entry is None or entry.value is None:
            raise LoginRefusedError(LoginFailure.UNKNOWN_REALM, name)
        return entry.value

    async def _password(self, userid: str, command: Login) -> LoginGranted:
        realm = await self._realm(userid)
        realm_check = self.realms.get(realm.type)
        if realm_check is None:  # an openid realm has no passwords
            raise LoginRefusedError(LoginFailure.BAD_CREDENTIALS, realm.realm)
        user = await self._user(userid)
        if not await realm_check.authenticate(user, command.password):
            raise LoginRefusedError(LoginFailure.BAD_CREDENTIALS, realm.realm)
        if any(factor.enable for factor in user.totp):
            if command.otp is None:
                current = self.ctx.view.ticket_keys
                if current is None:
                    raise RucherError(ErrorCode.UNAVAILABLE, "ticket keys are not ready yet")
                challenge = make_tfa_challenge(current.current, userid, time.time())
                return LoginGranted(username=userid, ticket=challenge, need_tfa=True)
            if not await self.factors.consume_totp(userid, command.otp.removeprefix("totp:")):
                raise LoginRefusedError(LoginFailure.SECOND_FACTOR, realm.realm)
            return await self._grant(userid, AuthMethod.PASSWORD, command.source, True)
        return await self._grant(userid, AuthMethod.PASSWORD, command.source, False)

    async def _second_factor(self, userid: str, command: Login) -> LoginGranted:
        try:
            challenged = verify_tfa_challenge(
                self._keys(), command.tfa_challenge or "", time.time()
            )
        except TicketError as err:
            raise LoginRefusedError(LoginFailure.SECOND_FACTOR) from err
        if challenged != userid:
            raise LoginRefusedError(LoginFailure.SECOND_FACTOR)
        await self._user(userid)
        kind, _, code = command.password.rpartition(":")
        if kind not in ("", "totp") or not await self.factors.consume_totp(userid, code):
            raise LoginRefusedError(LoginFailure.SECOND_FACTOR)
        return await self._grant(userid, AuthMethod.PASSWORD, command.source, True)

    async def _renew(self, userid: str, ticket: str, source: str) -> LoginGranted:
        try:
            holder = verify_ticket(self._keys(), ticket, time.time())
        except TicketError as err:
            raise LoginRefusedError(LoginFailure.BAD_CREDENTIALS) from err
        if holder != userid:
            raise LoginRefusedError(LoginFailure.BAD_CREDENTIALS)
        await self._user(userid)
        return await self._grant(userid, AuthMethod.TICKET, source, False)

    async def _grant(
        self, userid: str, method: AuthMethod, source: str, second_factor: bool
    ) -> LoginGranted:
        keys = self.ctx.view.ticket_keys
        if keys is None:
            raise RucherError(ErrorCode.UNAVAILABLE, "ticket keys are not ready yet")
        now = time.time()
        event = LoginSucceeded(
            authid=userid,
            method=method,
            source=source,
            second_factor=second_factor,
            **self.ctx.meta(),
        )
        await self.ctx.audit.emit(LOGIN_SUCCEEDED, event)
        if source:
            await self.ctx.tables.throttle.delete(make_key(THROTTLE, source))
        return LoginGranted(
            username=userid,
            ticket=make_ticket(keys.current, userid, now),
            csrf_token=make_csrf_token(keys.current, userid, now),
            cap=self.ctx.view.index.capabilities(userid),
            clustername=self.ctx.settings.clustername,
        )

    async def _refuse(
        self, username: str, method: AuthMethod, source: str, refused: LoginRefusedError
    ) -> NoReturn:
        failures = await self._count_failure(source) if source else 1
        low, high = self.ctx.settings.failure_delay
        delay = random.uniform(low, high)  # noqa: S311 - jitter, not a secret
        excess = failures - self.ctx.settings.throttle_after
        if excess > 0:
            delay += min(self.ctx.settings.throttle_max, float(2 ** (excess - 1)))
        event = LoginFailed(
            username=username[:256],
            method=method,
            source=source,
            reason=refused.reason,
            realm=refused.realm,
            **self.ctx.meta(),
        )
        await self.ctx.audit.emit(LOGIN_FAILED, event)
        log.info(
            "login_refused",
            user=username[:64],
            source=source,
            failures=failures,
            reason=refused.reason.value,
            delay=round(delay, 2),
        )
        await asyncio.sleep(delay)
        raise RucherError(ErrorCode.UNAUTHENTICATED, "authentication failure")

    async def _count_failure(self, source: str) -> int:
        """Count one more failure from ``source`` (shared by every IAM instance)."""
        key = make_key(THROTTLE, source)
        window = self.ctx.settings.throttle_window
        table = self.ctx.tables.throttle
        for _ in range(5):
            entry = await table.get(key)
            failures = 1 if entry is None or entry.value is None else entry.value.failures + 1
            record = LoginThrottle(source=source, failures=failures, last=time.time())
            try:
                if entry is None or entry.value is None:
                    await table.create(key, record, ttl=window)
                else:
                    await table.update(key, record, revision=entry.revision, ttl=window)
            except RucherError as err:
                if err.code not in (ErrorCode.CONFLICT, ErrorCode.EXISTS):
                    raise
                continue
            return failures
        return self.ctx.settings.throttle_after + 1

    # OpenID ---------------------------------------------------------------------------------

    async def _openid_realm(self, name: str) -> RealmRecord:
        entry = await self.ctx.tables.domains.get(domain_key(name))
        if entry is None or entry.value is None or entry.value.type is not RealmType.OPENID:
            raise invalid("realm", f"'{name}' is not an openid realm")
        return entry.value

    async def openid_auth_url(self, command: OpenIdAuthUrl) -> OpenIdAuthUrlIssued:
        """Remember a new login attempt and give the provider URL to send the browser to."""
        realm = await self._openid_realm(command.realm)
        if not command.redirect_url.startswith(("https://", "http://")):
            raise invalid("redirect-url", "the redirect URL must be an http(s) URL")
        pkce = Pkce.new()
        state = OpenIdLoginState(
            state=secrets.token_urlsafe(24),
            realm=realm.realm,
            redirect_url=command.redirect_url,
            code_verifier=pkce.verifier,
            nonce=secrets.token_urlsafe(24),
            created=time.time(),
        )
        url = await self.providers(realm).authorization_url(
            command.redirect_url, state.state, state.nonce, pkce.challenge
        )
        await self.ctx.tables.oidc.create(make_key(OIDC, state.state), state, ttl=OIDC_STATE_TTL)
        return OpenIdAuthUrlIssued(url=url)

    async def openid_login(self, command: OpenIdLogin) -> LoginGranted:
        """Redeem the provider's code for the attempt ``state`` names; issue a ticket."""
        key = make_key(OIDC, command.state) if command.state else ""
        entry = await self.ctx.tables.oidc.get(key) if key else None
        if entry is None or entry.value is None:
            raise RucherError(ErrorCode.UNAUTHENTICATED, "unknown or expired OpenID login state")
        attempt = entry.value
        try:  # each state is good for one attempt only
            await self.ctx.tables.oidc.delete(key, revision=entry.revision)
        except RucherError as err:
            raise RucherError(ErrorCode.UNAUTHENTICATED, "OpenID login state already used") from err
        if command.redirect_url != attempt.redirect_url:
            raise invalid("redirect-url", "the redirect URL differs from the one used to start")
        realm = await self._openid_realm(attempt.realm)
        claims = await self.providers(realm).exchange(
            command.code, attempt.redirect_url, attempt.code_verifier, attempt.nonce
        )
        userid = f"{username_of(realm, claims)}@{realm.realm}"
        if not _USERID.match(userid):
            raise RucherError(ErrorCode.UNAUTHENTICATED, f"'{userid}' is not a valid user id")
        groups = groups_of(realm, claims)[:_MAX_GROUPS]
        await self._provision(realm, userid, claims, groups)
        try:
            await self._user(userid)
        except LoginRefusedError as refused:
            await self._refuse(userid, AuthMethod.OPENID, command.source, refused)
        return await self._grant(userid, AuthMethod.OPENID, command.source, False)

    async def _provision(
        self, realm: RealmRecord, userid: str, claims: dict[str, object], groups: tuple[str, ...]
    ) -> None:
        if realm.groups_autocreate:
            for group in groups:
                comment = f"from {realm.realm} claims"
                try:
                    await self.ctx.tables.groups.create(
                        group_key(group), GroupRecord(groupid=group, comment=comment)
                    )
                except RucherError as err:
                    if err.code is not ErrorCode.EXISTS:
                        raise
        known = tuple(
            g
            for g in groups
            if group_key(g) in self.ctx.view.state.groups or realm.groups_autocreate
        )
        entry = await self.ctx.tables.users.get(user_key(userid))
        if entry is None or entry.value is None:
            if not realm.autocreate:
                raise RucherError(ErrorCode.UNAUTHENTICATED, f"user '{userid}' does not exist")
            record = UserRecord(
                userid=userid,
                email=str(claims.get("email") or "")[:256],
                firstname=str(claims.get("given_name") or "")[:256],
                lastname=str(claims.get("family_name") or "")[:256],
                groups=known,
                created=time.time(),
            )
            try:
                await self.ctx.tables.users.create(user_key(userid), record)
            except RucherError as err:
                if err.code is not ErrorCode.EXISTS:
                    raise
            log.info("openid_user_created", user=userid, groups=list(known))
            return
        user = entry.value
        suffix = f"-{realm.realm}"
        kept = tuple(g for g in user.groups if not (realm.groups_overwrite and g.endswith(suffix)))
        merged = tuple(dict.fromkeys((*kept, *known)))
        if merged != user.groups:
            await self.ctx.tables.users.update(
                user_key(userid),
                msgspec.structs.replace(user, groups=merged),
                revision=entry.revision,
            )
