"""Service settings from the environment: defaults and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from rucher.service import LogFormat, Settings, SettingsError


def test_defaults():
    settings = Settings.from_env("compute", {"RUCHER_NODE": "n1"})
    assert settings.nats_urls == ("nats://127.0.0.1:4222",)
    assert settings.node == "n1"
    assert settings.log_format is LogFormat.JSON
    assert settings.state_dir == Path(".state")
    assert settings.registry_ttl == 15.0
    assert settings.js_replicas is None


def test_a_cluster_url_list():
    settings = Settings.from_env("x", {"RUCHER_NATS_URL": "nats://a:1, nats://b:2,"})
    assert settings.nats_urls == ("nats://a:1", "nats://b:2")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUCHER_LOG_FORMAT", "xml"),
        ("RUCHER_REGISTRY_TTL", "soon"),
        ("RUCHER_REGISTRY_TTL", "-1"),
        ("RUCHER_NATS_URL", " , "),
    ],
)
def test_bad_values_name_their_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env("x", {variable: value})
