"""TOTP against RFC 6238's test vectors, replay refusal and otpauth URIs."""

from __future__ import annotations

import base64

import pytest

from rucher.pve.totp import (
    TotpError,
    TotpSpec,
    code_at,
    code_now,
    make_uri,
    new_secret,
    parse_uri,
    verify,
)

# RFC 6238 appendix B, SHA1: the secret is the ASCII "12345678901234567890", 8 digits.
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("time", "code"), RFC_VECTORS)
def test_rfc6238_vectors(time, code):
    spec = TotpSpec(secret=RFC_SECRET, digits=8)
    assert code_now(spec, time) == code
    assert code_at(spec, time // 30) == code


def test_verify_accepts_one_step_of_skew_and_each_code_once():
    spec = TotpSpec(secret=new_secret())
    now = 1_700_000_015.0
    step = int(now) // 30
    assert verify(spec, code_at(spec, step), now) == step
    assert verify(spec, code_at(spec, step - 1), now) == step - 1
    assert verify(spec, code_at(spec, step + 1), now) == step + 1
    assert verify(spec, code_at(spec, step - 2), now) is None
    assert verify(spec, code_at(spec, step), now, after_step=step) is None  # replayed
    assert verify(spec, "12345", now) is None
    assert verify(spec, "abcdef", now) is None


def test_uri_round_trip_and_errors():
    spec = TotpSpec(secret=new_secret(), digits=6, period=30)
    uri = make_uri(spec, "alice@pve")
    assert uri.startswith("otpauth://totp/Rucher%3Aalice%40pve?secret=")
    assert parse_uri(uri) == spec
    lower = "otpauth://totp/x?secret=" + spec.secret.lower() + "&digits=8&period=60"
    assert parse_uri(lower) == TotpSpec(secret=spec.secret, digits=8, period=60)
    for bad, why in (
        ("https://example.com", "otpauth"),
        ("otpauth://hotp/x?secret=AAAA", "otpauth"),
        ("otpauth://totp/x", "no secret"),
        ("otpauth://totp/x?secret=!!!!", "base32"),
        ("otpauth://totp/x?secret=AAAAAAAA&algorithm=SHA256", "SHA1"),
        ("otpauth://totp/x?secret=AAAAAAAA&digits=4", "digits"),
        ("otpauth://totp/x?secret=AAAAAAAA&period=x", "numbers"),
    ):
        with pytest.raises(TotpError, match=why):
            parse_uri(bad)
