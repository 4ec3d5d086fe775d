"""Structured errors carried in replies, task end states and events, with their HTTP mapping."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class ErrorCode(StrEnum):
    """Every error code Rucher puts on the bus. The gateway maps each to one HTTP status."""

    INVALID = "invalid"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    LOCKED = "locked"
    EXISTS = "exists"
    UNSUPPORTED = "unsupported"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    STALE_TOKEN = "stale_token"  # noqa: S105 - a code, not a secret
    MALFORMED = "malformed"
    INTERNAL = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.MALFORMED: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.LOCKED: 409,
    ErrorCode.EXISTS: 409,
    ErrorCode.STALE_TOKEN: 409,
    ErrorCode.UNSUPPORTED: 501,
    ErrorCode.CANCELLED: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}

# Codes a caller may retry unchanged and expect a different outcome.
RETRYABLE: frozenset[ErrorCode] = frozenset({ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE})


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error", tag_field="type"):
    """The reply to a request that failed: a code, a readable message, and structured details.

    ``details`` carries fields such as ``{"field": "memory"}`` for a 400 that names the bad input.
    """

    code: ErrorCode
    message: str
    retryable: bool = False
    details: dict[str, Any] = {}
