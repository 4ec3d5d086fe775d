"""IAM pieces without a bus: settings, the password file, PKCE, claim mapping, argon2id."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from rucher.bus import RucherError
from rucher.iam.bootstrap import write_password_once
from rucher.iam.config import IamSettings
from rucher.iam.realms.openid import (
    DiscoveredProvider,
    KeycloakProvider,
    Pkce,
    claim,
    groups_of,
    provider_for,
    username_of,
)
from rucher.iam.realms.pve import hash_password, verify_password
from rucher.proto.iam_state import RealmRecord, RealmType
from rucher.service import Settings, SettingsError


def base(tmp_path: Path) -> Settings:
    return Settings.from_env("iam", {"RUCHER_STATE_DIR": str(tmp_path)})


def test_settings_defaults_and_errors(tmp_path):
    settings = IamSettings.from_env(base(tmp_path), {})
    assert settings.admin_password is None
    assert settings.failure_delay == pytest.approx((2.0, 3.0))
    assert settings.key_rotation == 86_400.0
    assert settings.admin_password_file == tmp_path / "admin-password"
    custom = IamSettings.from_env(
        base(tmp_path), {"RUCHER_ADMIN_PASSWORD": "pw", "RUCHER_LOGIN_FAILURE_DELAY": "1"}
    )
    assert custom.admin_password == "pw" and custom.failure_delay == pytest.approx((0.8, 1.2))
    with pytest.raises(SettingsError, match="RUCHER_LOGIN_FAILURE_DELAY"):
        IamSettings.from_env(base(tmp_path), {"RUCHER_LOGIN_FAILURE_DELAY": "soon"})
    with pytest.raises(SettingsError, match="RUCHER_TICKET_KEY_ROTATION"):
        IamSettings.from_env(base(tmp_path), {"RUCHER_TICKET_KEY_ROTATION": "5"})


def test_the_admin_password_is_written_once_for_its_owner_only(tmp_path):
    path = tmp_path / "sub" / "admin-password"
    assert write_password_once(path, "first")
    assert path.stat().st_mode & 0o777 == 0o600
    assert not write_password_once(path, "second")
    assert path.read_text() == "first\n"


def test_argon2id_hashes():
    encoded = hash_password("correct horse")
    assert encoded.startswith("$argon2id$")
    assert verify_password(encoded, "correct horse")
    assert not verify_password(encoded, "wrong horse")
    assert not verify_password("", "anything")
    assert not verify_password("not-a-hash", "anything")


def test_pkce_pairs_follow_rfc7636():
    pair = Pkce.new()
    assert 43 <= len(pair.verifier) <= 128
    digest = hashlib.sha256(pair.verifier.encode()).digest()
    assert pair.challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert Pkce.new() != pair


def realm(**fields) -> RealmRecord:
    return RealmRecord(realm="corp", type=RealmType.OPENID, client_id="c", **fields)


def test_claims_map_to_users_and_groups():
    claims = {
        "sub": "u-1",
        "preferred_username": "alice",
        "groups": ["admins", "dev ops", "x" * 80, ""],
        "realm_access": {"roles": ["operator"]},
    }
    assert claim(claims, "realm_access.roles") == ["operator"]
    assert claim(claims, "realm_access.missing") is None
    assert username_of(realm(), claims) == "u-1"
    assert username_of(realm(username_claim="preferred_username"), claims) == "alice"
    with pytest.raises(RucherError, match="user name"):
        username_of(realm(username_claim="groups"), claims)
    with pytest.raises(RucherError):
        username_of(realm(), {"sub": "a@b"})
    groups = groups_of(realm(groups_claim="groups"), claims)
    assert groups == ("admins-corp", "dev_ops-corp", "x" * 59 + "-corp")
    assert groups_of(realm(groups_claim="realm_access.roles"), claims) == ("operator-corp",)
    assert groups_of(realm(), claims) == ()


def test_keycloak_issuers_get_the_keycloak_driver():
    keycloak = provider_for(realm(issuer_url="https://sso.example/realms/acme"), 5)
    assert isinstance(keycloak, KeycloakProvider)
    assert (keycloak.server_url, keycloak.realm_name) == ("https://sso.example/", "acme")
    legacy = provider_for(realm(issuer_url="https://sso.example/auth/realms/acme"), 5)
    assert isinstance(legacy, KeycloakProvider) and legacy.server_url == "https://sso.example/auth/"
    assert isinstance(provider_for(realm(issuer_url="https://idp.example"), 5), DiscoveredProvider)
