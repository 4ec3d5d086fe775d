"""Encoding of identifiers into JetStream KV keys and subject tokens.

KV keys allow only ``[-/_=.A-Za-z0-9]`` and use ``.`` to separate tokens, while Rucher's
identifiers hold ``:``, ``@``, ``!`` and dots (``UPID:n1:...:``, ``alice@pve!ci``, ``vm:100``).
Each identifier becomes one token: ``[A-Za-z0-9_-]`` stay as they are, every other byte of its
UTF-8 form becomes ``=XX`` (upper-case hex), ``=`` included. The encoding is reversible, keeps
short ids readable (``vm=3A100``) and never introduces a ``.``, so a multi-part key is built by
joining encoded tokens with ``.`` and watched with ``*``/``>`` per part.
"""

from __future__ import annotations

import re

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_HEX = re.compile(r"[0-9A-F]{2}")


def encode_token(identifier: str) -> str:
    """Encode one identifier as a single KV key or subject token."""
    if not identifier:
        raise ValueError("an empty identifier cannot be a key token")
    raw = identifier.encode()
    if all(byte in _SAFE for byte in raw):
        return identifier
    return "".join(chr(byte) if byte in _SAFE else f"={byte:02X}" for byte in raw)


def decode_token(token: str) -> str:
    """Invert :func:`encode_token`; a token that no identifier encodes to is refused."""
    if "=" not in token:
        return token
    out = bytearray()
    pos = 0
    while pos < len(token):
        if token[pos] == "=":
            digits = token[pos + 1 : pos + 3]
            if not _HEX.fullmatch(digits):
                raise ValueError(f"malformed key token {token!r}")
            out.append(int(digits, 16))
            pos += 3
        else:
            out += token[pos].encode()
            pos += 1
    return out.decode()


def make_key(*identifiers: str) -> str:
    """A multi-part key: each identifier encoded, joined by ``.``."""
    return ".".join(encode_token(identifier) for identifier in identifiers)


def split_key(key: str) -> list[str]:
    """Invert :func:`make_key`."""
    return [decode_token(token) for token in key.split(".")]
