"""Time-based one-time passwords (RFC 6238, HMAC-SHA1) and ``otpauth://`` URIs.

Verification accepts the code of the current step and of one step either side (clock skew) and
returns the step it matched, so the caller can refuse a code used twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_DIGITS = 6
DEFAULT_PERIOD = 30
WINDOW = 1


class TotpError(ValueError):
    """A TOTP URI, secret or code that cannot be used."""


@dataclass(frozen=True)
class TotpSpec:
    """A TOTP factor's secret (base32) and parameters."""

    secret: str
    digits: int = DEFAULT_DIGITS
    period: int = DEFAULT_PERIOD


def new_secret() -> str:
    """A random 160-bit secret, base32 without padding."""
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


def _key(secret: str) -> bytes:
    cleaned = secret.replace(" ", "").upper()
    try:
        return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError) as err:
        raise TotpError("TOTP secret is not base32") from err


def code_at(spec: TotpSpec, step: int) -> str:
    """The code of time step ``step`` (RFC 4226 dynamic truncation)."""
    digest = hmac.new(_key(spec.secret), struct.pack(">Q", step), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**spec.digits).zfill(spec.digits)


def code_now(spec: TotpSpec, now: float) -> str:
    """The code valid at ``now``."""
    return code_at(spec, int(now) // spec.period)


def verify(spec: TotpSpec, code: str, now: float, after_step: int = 0) -> int | None:
    """The step ``code`` belongs to (near ``now`` and later than ``after_step``), else ``None``."""
    code = code.strip()
    if len(code) != spec.digits or not code.isdigit():
        return None
    current = int(now) // spec.period
    for step in range(current - WINDOW, current + WINDOW + 1):
        if step > after_step and hmac.compare_digest(code_at(spec, step), code):
            return step
    return None


def parse_uri(uri: str) -> TotpSpec:
    """The factor described by an ``otpauth://totp/...`` URI (SHA1 only, as Proxmox)."""
    parts = urlsplit(uri)
    if parts.scheme != "otpauth" or parts.netloc != "totp":
        raise TotpError("not an otpauth://totp/ URI")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    secret = query.get("secret", "")
    if not secret:
        raise TotpError("the URI has no secret")
    _key(secret)
    if query.get("algorithm", "SHA1").upper() != "SHA1":
        raise TotpError("only SHA1 TOTP is supported")
    try:
        digits = int(query.get("digits", DEFAULT_DIGITS))
        period = int(query.get("period", DEFAULT_PERIOD))
    except ValueError as err:
        raise TotpError("digits and period must be numbers") from err
    if digits not in (6, 7, 8) or not 10 <= period <= 300:
        raise TotpError("digits must be 6-8 and period 10-300 s")
    cleaned = secret.replace(" ", "").upper().rstrip("=")
    return TotpSpec(secret=cleaned, digits=digits, period=period)


def make_uri(spec: TotpSpec, account: str, issuer: str = "Rucher") -> str:
    """An ``otpauth://`` URI for authenticator apps."""
    label = quote(f"{issuer}:{unquote(account)}")
    return (
        f"otpauth://totp/{label}?secret={spec.secret}&issuer={quote(issuer)}"
        f"&digits={spec.digits}&period={spec.period}&algorithm=SHA1"
    )
