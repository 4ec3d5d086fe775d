"""API tokens: ids ``user@realm!tokenid``, secrets, their storage hashes and the request header.

A secret is a random UUID, as Proxmox makes them (122 random bits). Only its SHA-256 is stored:
with that much entropy a slow hash buys nothing, and checking a token on every request must be
cheap. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid

from rucher.proto.iam_state import TokenRecord

HEADER_PREFIX = "PVEAPIToken"
_USER = r"[^\s:@!/]{1,64}@[A-Za-z][A-Za-z0-9._-]{0,31}"
_TOKEN_NAME = r"[A-Za-z][A-Za-z0-9._-]{0,63}"  # noqa: S105 - a pattern, not a secret
_TOKENID = re.compile(rf"^({_USER})!({_TOKEN_NAME})$")
_TOKEN_NAME_ONLY = re.compile(rf"^{_TOKEN_NAME}$")


class TokenError(ValueError):
    """An API token header or id that is malformed."""


def split_tokenid(tokenid: str) -> tuple[str, str]:
    """``(userid, token name)`` of a full token id; raises :class:`TokenError` if malformed."""
    match = _TOKENID.match(tokenid)
    if match is None:
        raise TokenError(f"'{tokenid}' is not a valid token ID")
    return match.group(1), match.group(2)


def join_tokenid(userid: str, name: str) -> str:
    """The full token id of ``name`` under ``userid``; raises :class:`TokenError` if malformed."""
    tokenid = f"{userid}!{name}"
    split_tokenid(tokenid)
    return tokenid


def valid_token_name(name: str) -> bool:
    """Whether ``name`` is a valid token id within its user."""
    return bool(_TOKEN_NAME_ONLY.match(name))


def new_secret() -> str:
    """A fresh token secret, a random UUID like Proxmox's."""
    return str(uuid.uuid4())


def hash_secret(secret: str) -> str:
    """The storage form of a secret: SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(token: TokenRecord, secret: str) -> bool:
    """Whether ``secret`` is the token's secret (constant-time)."""
    if not token.secret_hash:
        return False
    return hmac.compare_digest(token.secret_hash, hash_secret(secret))


def parse_header(value: str) -> tuple[str, str]:
    """``(tokenid, secret)`` from ``PVEAPIToken=USER@REALM!TOKENID=SECRET``."""
    scheme, sep, rest = value.strip().partition("=")
    if not sep or scheme.strip() != HEADER_PREFIX:
        raise TokenError("not a PVEAPIToken authorization")
    tokenid, sep, secret = rest.strip().rpartition("=")
    if not sep or not secret:
        raise TokenError("no token secret given")
    split_tokenid(tokenid)
    return tokenid, secret
