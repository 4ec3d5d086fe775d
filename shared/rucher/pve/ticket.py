"""Proxmox-shaped login tickets and CSRF tokens, signed with HMAC-SHA256 under rotating keys.

A ticket is ``PVE:{userid}:{hex timestamp}::{signature}``, the shape Proxmox clients expect (they
only pass it back); a TFA challenge ticket carries ``!tfa!{userid}`` instead of the user. A CSRF
token is ``{hex timestamp}:{signature}`` bound to the user. Signatures are URL-safe base64 of
HMAC-SHA256 under a cluster-wide key; keys rotate daily and verification accepts the current and
the previous key, so a rotation never logs anyone out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from rucher.proto.iam_state import SigningKey

PREFIX = "PVE"
TICKET_LIFETIME = 7200
TFA_LIFETIME = 300
CLOCK_SKEW = 300  # Proxmox's grace period for tickets stamped a little in the future
_TFA_MARK = "!tfa!"


class TicketError(ValueError):
    """A ticket or CSRF token that is malformed, forged, expired or for someone else."""


def new_signing_key(now: float) -> SigningKey:
    """A fresh random 256-bit signing key."""
    return SigningKey(
        id=secrets.token_hex(8),
        secret=base64.b64encode(secrets.token_bytes(32)).decode(),
        created=now,
    )


def _sign(key: SigningKey, data: str) -> str:
    digest = hmac.new(base64.b64decode(key.secret), data.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _signed_by(keys: Iterable[SigningKey | None], data: str, signature: str) -> bool:
    return any(key is not None and hmac.compare_digest(_sign(key, data), signature) for key in keys)


def _stamp(now: float) -> str:
    return f"{int(now):08X}"


def make_ticket(key: SigningKey, userid: str, now: float) -> str:
    """A ticket for ``userid`` issued at ``now``."""
    plain = f"{PREFIX}:{userid}:{_stamp(now)}"
    return f"{plain}::{_sign(key, plain)}"


def make_tfa_challenge(key: SigningKey, userid: str, now: float) -> str:
    """A half ticket: the password was right, the second factor is still owed."""
    return make_ticket(key, _TFA_MARK + userid, now)


def _check(keys: Iterable[SigningKey | None], ticket: str, now: float, max_age: float) -> str:
    plain, sep, signature = ticket.rpartition("::")
    parts = plain.split(":")
    if not sep or len(parts) != 3 or parts[0] != PREFIX or not parts[1]:
        raise TicketError("malformed ticket")
    try:
        issued = int(parts[2], 16)
    except ValueError as err:
        raise TicketError("malformed ticket timestamp") from err
    if not _signed_by(keys, plain, signature):
        raise TicketError("invalid ticket signature")
    age = now - issued
    if age < -CLOCK_SKEW or age > max_age:
        raise TicketError("ticket expired")
    return parts[1]


def verify_ticket(
    keys: Iterable[SigningKey | None], ticket: str, now: float, max_age: float = TICKET_LIFETIME
) -> str:
    """The user a ticket was issued to; raises :class:`TicketError` if it is not valid now."""
    subject = _check(keys, ticket, now, max_age)
    if subject.startswith(_TFA_MARK):
        raise TicketError("ticket only proves the first factor")
    return subject


def verify_tfa_challenge(
    keys: Iterable[SigningKey | None], ticket: str, now: float, max_age: float = TFA_LIFETIME
) -> str:
    """The user a TFA challenge ticket was issued to; raises :class:`TicketError` otherwise."""
    subject = _check(keys, ticket, now, max_age)
    if not subject.startswith(_TFA_MARK):
        raise TicketError("not a TFA challenge")
    return subject[len(_TFA_MARK) :]


def make_csrf_token(key: SigningKey, userid: str, now: float) -> str:
    """The CSRF prevention token bound to ``userid``."""
    stamp = _stamp(now)
    return f"{stamp}:{_sign(key, f'{stamp}:{userid}')}"


def verify_csrf_token(
    keys: Iterable[SigningKey | None],
    userid: str,
    token: str,
    now: float,
    max_age: float = TICKET_LIFETIME,
) -> None:
    """Raise :class:`TicketError` unless ``token`` is a valid CSRF token of ``userid`` now."""
    stamp, sep, signature = token.partition(":")
    if not sep or len(stamp) != 8:
        raise TicketError("malformed CSRF token")
    try:
        issued = int(stamp, 16)
    except ValueError as err:
        raise TicketError("malformed CSRF token timestamp") from err
    data = f"{stamp}:{userid}"
    if not _signed_by(keys, data, signature):
        raise TicketError("invalid CSRF token")
    age = now - issued
    if age < -CLOCK_SKEW or age > max_age:
        raise TicketError("CSRF token expired")
