"""Message encoding: msgspec JSON, one cached decoder per type."""

from __future__ import annotations

import functools
import re
from typing import Any, TypeVar, cast

import msgspec

from rucher.bus.errors import RucherError
from rucher.proto.errors import ErrorCode

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """Encode a message for the wire."""
    return _encoder.encode(message)


@functools.cache
def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(kind)


def decode(data: bytes, kind: type[T]) -> T:
    """Decode and validate ``data`` as ``kind``; a bad payload raises a MALFORMED error."""
    try:
        return _decoder(cast(Any, kind)).decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError as err:
        field = offending_field(str(err))
        raise RucherError(
            ErrorCode.MALFORMED,
            f"malformed {_name(kind)}: {err}",
            details={"field": field} if field else {},
        ) from err


_AT_PATH = re.compile(r"at `\$\.([A-Za-z_][\w-]*)")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def offending_field(message: str) -> str | None:
    """The top-level field a msgspec validation message blames, if it names one."""
    match = _AT_PATH.search(message) or _MISSING.search(message)
    return match.group(1) if match else None


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))
