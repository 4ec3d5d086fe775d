"""API token ids, secrets, hashes and the PVEAPIToken header."""

from __future__ import annotations

import uuid

import pytest

from rucher.proto.iam_state import TokenRecord
from rucher.pve.tokens import (
    TokenError,
    hash_secret,
    join_tokenid,
    new_secret,
    parse_header,
    secret_matches,
    split_tokenid,
    valid_token_name,
)


def test_token_ids_split_and_join():
    assert split_tokenid("alice@pve!ci") == ("alice@pve", "ci")
    assert split_tokenid("root@pam!terraform-1.x_y") == ("root@pam", "terraform-1.x_y")
    assert join_tokenid("alice@pve", "ci") == "alice@pve!ci"
    for bad in ("alice@pve", "alice!ci", "alice@pve!", "alice@pve!1ci", "a b@pve!ci", "@pve!x"):
        with pytest.raises(TokenError):
            split_tokenid(bad)
    assert valid_token_name("ci") and not valid_token_name("9lives") and not valid_token_name("")


def test_secrets_are_uuids_and_only_their_hash_is_kept():
    secret = new_secret()
    assert uuid.UUID(secret).version == 4
    assert new_secret() != secret
    record = TokenRecord(tokenid="alice@pve!ci", secret_hash=hash_secret(secret))
    assert secret not in record.secret_hash and len(record.secret_hash) == 64
    assert secret_matches(record, secret)
    assert not secret_matches(record, new_secret())
    assert not secret_matches(record, secret.upper())
    assert not secret_matches(TokenRecord(tokenid="alice@pve!ci"), "")


def test_header_parsing():
    secret = new_secret()
    assert parse_header(f"PVEAPIToken=alice@pve!ci={secret}") == ("alice@pve!ci", secret)
    assert parse_header(f"  PVEAPIToken=root@pam!tf={secret} ") == ("root@pam!tf", secret)
    for bad in (
        f"Bearer alice@pve!ci={secret}",
        "PVEAPIToken=alice@pve!ci",
        "PVEAPIToken=alice@pve!ci=",
        f"PVEAPIToken=alice@pve={secret}",
        f"PVEAuthCookie=alice@pve!ci={secret}",
        "",
    ):
        with pytest.raises(TokenError):
            parse_header(bad)
