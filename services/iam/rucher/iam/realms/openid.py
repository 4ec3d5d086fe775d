"""The ``openid`` realm: OpenID Connect authorization code flow with PKCE.

Any provider is found by discovery (``{issuer}/.well-known/openid-configuration``); an issuer
that is a Keycloak realm URL (``.../realms/{name}``) is driven through python-keycloak instead.
Either way the ID token's signature (the provider's JWKS), issuer, audience, expiry and nonce are
checked before its claims are believed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import httpx
import structlog
from jwcrypto import jwk, jwt  # type: ignore[import-untyped]
from jwcrypto.common import JWException  # type: ignore[import-untyped]
from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakError

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import RealmRecord

log = structlog.get_logger("rucher.iam.openid")

_KEYCLOAK_ISSUER = re.compile(r"^(https?://.+?)/realms/([^/]+)/?$")
_GROUP_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Pkce:
    """A PKCE verifier and its S256 challenge."""

    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        """A fresh pair (a 64-character verifier)."""
        verifier = secrets.token_urlsafe(48)
        digest = hashlib.sha256(verifier.encode()).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())


class OpenIdProvider(Protocol):
    """One realm's provider: where to send the browser, and the claims a code is worth."""

    async def authorization_url(
        self, redirect_url: str, state: str, nonce: str, challenge: str
    ) -> str:
        """The provider's authorization URL for this login attempt."""
        ...

    async def exchange(
        self, code: str, redirect_url: str, verifier: str, nonce: str
    ) -> dict[str, Any]:
        """Redeem ``code`` and return the verified claims (ID token, then userinfo)."""
        ...


def _failed(message: str, err: Exception | None = None) -> RucherError:
    log.warning("openid_login_failed", reason=message, error=repr(err) if err else None)
    return RucherError(ErrorCode.UNAUTHENTICATED, f"OpenID login failed: {message}")


def _unreachable(err: Exception) -> RucherError:
    return RucherError(ErrorCode.UNAVAILABLE, f"OpenID provider unreachable: {err}")


def _scope(realm: RealmRecord) -> str:
    scopes = realm.scopes.split()
    return " ".join(["openid", *[scope for scope in scopes if scope != "openid"]])


def _extra_params(realm: RealmRecord) -> dict[str, str]:
    extra = {}
    if realm.prompt:
        extra["prompt"] = realm.prompt
    if realm.acr_values:
        extra["acr_values"] = realm.acr_values
    return extra


def _check_claims(realm: RealmRecord, nonce: str) -> dict[str, Any]:
    return {
        "iss": realm.issuer_url.rstrip("/"),
        "aud": realm.client_id,
        "exp": None,
        "nonce": nonce,
    }


def _merge_userinfo(claims: dict[str, Any], info: Any) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise _failed("userinfo is not a JSON object")
    if info.get("sub") != claims.get("sub"):
        raise _failed("userinfo is about another subject")
    return {**claims, **info}


class DiscoveredProvider:
    """A standard provider, configured from its discovery document."""

    def __init__(self, realm: RealmRecord, timeout: float) -> None:
        self.realm = realm
        self.issuer = realm.issuer_url.rstrip("/")
        self.timeout = timeout
        self._config: dict[str, Any] | None = None

    async def _discover(self, client: httpx.AsyncClient) -> dict[str, Any]:
        if self._config is None:
            response = await client.get(f"{self.issuer}/.well-known/openid-configuration")
            response.raise_for_status()
            config = response.json()
            if str(config.get("issuer", "")).rstrip("/") != self.issuer:
                raise _failed("the discovery document names another issuer")
            self._config = config
        return self._config

    async def authorization_url(
        self, redirect_url: str, state: str, nonce: str, challenge: str
    ) -> str:
        """The authorization endpoint with the code flow, PKCE S256 and our scopes."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                config = await self._discover(client)
        except httpx.HTTPError as err:
            raise _unreachable(err) from err
        params = {
            "response_type": "code",
            "client_id": self.realm.client_id,
            "redirect_uri": redirect_url,
            "scope": _scope(self.realm),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **_extra_params(self.realm),
        }
        return f"{config['authorization_endpoint']}?{urlencode(params, quote_via=quote)}"

    async def exchange(
        self, code: str, redirect_url: str, verifier: str, nonce: str
    ) -> dict[str, Any]:
        """Redeem the code at the token endpoint; verify the ID token; add userinfo."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                config = await self._discover(client)
                form = {
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": redirect_url,
                    "code_verifier": verifier,
                    "client_id": self.realm.client_id,
                }
                auth: httpx.Auth | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
                methods = config.get("token_endpoint_auth_methods_supported", [])
                if self.realm.client_key and "client_secret_post" in methods:
                    form["client_secret"] = self.realm.client_key
                elif self.realm.client_key:
                    auth = httpx.BasicAuth(self.realm.client_id, self.realm.client_key)
                response = await client.post(config["token_endpoint"], data=form, auth=auth)
                if response.status_code != 200:
                    raise _failed(f"token endpoint answered {response.status_code}")
                tokens = response.json()
                keys = await client.get(config["jwks_uri"])
                keys.raise_for_status()
                claims = self._verify(tokens.get("id_token", ""), keys.text, nonce)
                endpoint = config.get("userinfo_endpoint")
                if self.realm.query_userinfo and endpoint:
                    bearer = {"Authorization": f"Bearer {tokens.get('access_token', '')}"}
                    info = await client.get(endpoint, headers=bearer)
                    info.raise_for_status()
                    claims = _merge_userinfo(claims, info.json())
        except httpx.HTTPError as err:
            raise _unreachable(err) from err
        return claims

    def _verify(self, id_token: str, jwks: str, nonce: str) -> dict[str, Any]:
        try:
            keyset = jwk.JWKSet.from_json(jwks)
            token = jwt.JWT(jwt=id_token, check_claims=_check_claims(self.realm, nonce))
            token.validate(keyset)
            claims: dict[str, Any] = jwt.json_decode(token.claims)
        except (JWException, ValueError) as err:
            raise _failed("the ID token does not verify", err) from err
        return claims


class KeycloakProvider:
    """A Keycloak realm, driven through python-keycloak."""

    def __init__(self, realm: RealmRecord, timeout: float) -> None:
        match = _KEYCLOAK_ISSUER.match(realm.issuer_url)
        if match is None:
            raise ValueError(f"{realm.issuer_url} is not a Keycloak realm URL")
        self.realm = realm
        self.server_url = match.group(1) + "/"
        self.realm_name = match.group(2)
        self.timeout = timeout

    def _client(self) -> KeycloakOpenID:
        # One client per call: python-keycloak keeps per-request headers on the client.
        return KeycloakOpenID(
            server_url=self.server_url,
            realm_name=self.realm_name,
            client_id=self.realm.client_id,
            client_secret_key=self.realm.client_key or None,
            timeout=int(self.timeout),
        )

    async def _check_issuer(self, client: KeycloakOpenID) -> None:
        issuer = str((await client.a_well_known()).get("issuer", "")).rstrip("/")
        if issuer != self.realm.issuer_url.rstrip("/"):
            raise _failed("the realm's discovery document names another issuer")

    async def authorization_url(
        self, redirect_url: str, state: str, nonce: str, challenge: str
    ) -> str:
        """python-keycloak's authorization URL, with PKCE S256."""
        client = self._client()
        try:
            await self._check_issuer(client)
            # python-keycloak formats the URL without escaping: hand it escaped values.
            url = await client.a_auth_url(
                redirect_uri=quote(redirect_url, safe=""),
                scope=quote(_scope(self.realm), safe=""),
                state=state,
                nonce=nonce,
                code_challenge=challenge,
                code_challenge_method="S256",
            )
        except (KeycloakError, httpx.HTTPError) as err:
            raise _unreachable(err) from err
        extra = _extra_params(self.realm)
        return f"{url}&{urlencode(extra, quote_via=quote)}" if extra else url

    async def exchange(
        self, code: str, redirect_url: str, verifier: str, nonce: str
    ) -> dict[str, Any]:
        """Redeem the code, verify the ID token against the realm's certs, add userinfo."""
        client = self._client()
        try:
            tokens = await client.a_token(
                grant_type="authorization_code",
                code=code,
                redirect_uri=redirect_url,
                code_verifier=verifier,
            )
        except KeycloakError as err:
            raise _failed("the token endpoint refused the code", err) from err
        except httpx.HTTPError as err:
            raise _unreachable(err) from err
        try:
            claims: dict[str, Any] = await client.a_decode_token(
                tokens.get("id_token", ""), check_claims=_check_claims(self.realm, nonce)
            )
        except (JWException, ValueError) as err:
            raise _failed("the ID token does not verify", err) from err
        except (KeycloakError, httpx.HTTPError) as err:
            raise _unreachable(err) from err
        if self.realm.query_userinfo:
            try:
                info = await client.a_userinfo(tokens.get("access_token", ""))
            except (KeycloakError, httpx.HTTPError) as err:
                raise _failed("userinfo was refused", err) from err
            claims = _merge_userinfo(claims, info)
        return claims


def is_keycloak_issuer(issuer_url: str) -> bool:
    """Whether ``issuer_url`` has Keycloak's realm URL shape."""
    return _KEYCLOAK_ISSUER.match(issuer_url) is not None


def provider_for(realm: RealmRecord, timeout: float) -> OpenIdProvider:
    """The provider driver for an openid realm."""
    if is_keycloak_issuer(realm.issuer_url):
        return KeycloakProvider(realm, timeout)
    return DiscoveredProvider(realm, timeout)


def provider_cache(timeout: float) -> Callable[[RealmRecord], OpenIdProvider]:
    """A provider factory that reuses one driver (and its discovery) per realm configuration."""
    cache: dict[RealmRecord, OpenIdProvider] = {}

    def provider(realm: RealmRecord) -> OpenIdProvider:
        if realm not in cache:
            cache.clear() if len(cache) > 64 else None
            cache[realm] = provider_for(realm, timeout)
        return cache[realm]

    return provider


def claim(claims: dict[str, Any], dotted: str) -> Any:
    """The claim at a dotted path (``realm_access.roles``), or ``None``."""
    value: Any = claims
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def username_of(realm: RealmRecord, claims: dict[str, Any]) -> str:
    """The user name (before ``@realm``) the claims identify."""
    value = claim(claims, realm.username_claim or "sub")
    if not isinstance(value, str) or not value or re.search(r"[\s:@!/]", value):
        raise _failed(f"claim {realm.username_claim or 'sub'!r} is not a usable user name")
    return value


def groups_of(realm: RealmRecord, claims: dict[str, Any]) -> tuple[str, ...]:
    """The Rucher groups the claims map to: each value becomes ``{value}-{realm}``."""
    if not realm.groups_claim:
        return ()
    values = claim(claims, realm.groups_claim)
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        return ()
    suffix = f"-{realm.realm}"
    room = 64 - len(suffix)
    groups = {
        _GROUP_CHARS.sub("_", str(value))[:room] + suffix
        for value in values
        if str(value).strip() and room > 0
    }
    return tuple(sorted(groups))
