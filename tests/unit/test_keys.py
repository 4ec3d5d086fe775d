"""KV key and subject token encoding."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rucher.proto.keys import decode_token, encode_token, make_key, split_key

KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


@given(st.text(min_size=1))
def test_any_identifier_round_trips_as_one_valid_token(identifier):
    token = encode_token(identifier)
    assert KV_KEY.match(token)
    assert "." not in token
    assert decode_token(token) == identifier


@given(st.lists(st.text(min_size=1), min_size=1, max_size=5))
def test_multi_part_keys_round_trip(parts):
    assert split_key(make_key(*parts)) == parts


@pytest.mark.parametrize(
    ("identifier", "token"),
    [
        ("100", "100"),
        ("vm:100", "vm=3A100"),
        ("alice@pve!ci", "alice=40pve=21ci"),
        ("n1.example.com", "n1=2Eexample=2Ecom"),
        ("a=b", "a=3Db"),
        ("UPID:n1:0000000A:", "UPID=3An1=3A0000000A=3A"),
    ],
)
def test_readable_encodings(identifier, token):
    assert encode_token(identifier) == token


@pytest.mark.parametrize("bad", ["=", "=4", "=zz", "a=4G", "x=3"])
def test_tokens_no_identifier_encodes_to_are_refused(bad):
    with pytest.raises(ValueError, match="malformed"):
        decode_token(bad)


def test_empty_identifiers_are_refused():
    with pytest.raises(ValueError, match="empty"):
        encode_token("")
