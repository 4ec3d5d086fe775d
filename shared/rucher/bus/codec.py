"""Message encoding: msgspec JSON, one cached decoder per type."""

from __future__ import annotations

import functools
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
        raise RucherError(ErrorCode.MALFORMED, f"malformed {_name(kind)}: {err}") from err


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))
