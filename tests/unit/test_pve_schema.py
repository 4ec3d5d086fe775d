"""The extracted Proxmox schema: fresh, complete for what it names, and readable by rucher.pve."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from rucher.pve.schema import Param
from rucher.pve.values import known_format

from .pve_fixtures import APIDATA, ROOT, SCHEMA_FILE, schema


@pytest.mark.skipif(not APIDATA.exists(), reason="the Proxmox fixture is not beside the checkout")
def test_the_committed_schema_is_what_the_generator_writes():
    result = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "gen_pve_schema.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _params(param: Param) -> list[Param]:
    found = [param]
    if isinstance(param.format, dict):
        for sub in param.format.values():
            found += _params(sub)
    return found


def _all_params() -> list[tuple[str, Param]]:
    found: list[tuple[str, Param]] = []
    for endpoint in schema().endpoints:
        for name, param in endpoint.parameters.properties.items():
            found += [(f"{endpoint.method} {endpoint.path} {name}", p) for p in _params(param)]
    for fmt_name, fmt in schema().formats.items():
        for key, param in fmt.items():
            found += [(f"format {fmt_name}.{key}", p) for p in _params(param)]
    return found


def test_every_named_format_is_checked_or_is_an_exported_property_string():
    unknown = {
        where: param.format
        for where, param in _all_params()
        if isinstance(param.format, str)
        and not known_format(param.format)
        and param.format not in schema().formats
    }
    assert unknown == {}


def test_every_pattern_is_a_python_regex():
    patterns = [(where, param.regex) for where, param in _all_params() if param.pattern]
    assert patterns, "the schema holds patterns (tokenid, trunks...)"
    assert all("(?^" not in param.pattern for _, param in _all_params() if param.pattern)


def test_permissions_are_world_all_or_a_check_clause():
    for endpoint in schema().endpoints:
        permissions = endpoint.permissions
        assert permissions.user in {"world", "all"} or permissions.check, endpoint.key


def test_only_login_realms_and_openid_are_open_to_the_world():
    world = {e.key for e in schema().endpoints if e.permissions.user == "world"}
    assert world == {
        ("GET", "/access/ticket"),
        ("POST", "/access/ticket"),
        ("GET", "/access/domains"),
        ("POST", "/access/openid/auth-url"),
        ("POST", "/access/openid/login"),
    }


def test_flags_and_constraints_survive_extraction():
    tasks = schema().endpoint("GET", "/nodes/{node}/tasks")
    limit = tasks.parameters.properties["limit"]
    assert (limit.type, limit.minimum, limit.default, limit.optional) == ("integer", 0, 50, True)
    assert tasks.parameters.properties["node"].optional is False
    assert tasks.allowtoken is True
    assert schema().endpoint("POST", "/access/ticket").allowtoken is False
    acl = schema().endpoint("PUT", "/access/acl")
    assert acl.permissions.check == ("perm-modify", "{path}")
    assert acl.protected is True


def test_typetext_only_formats_become_sub_property_schemas():
    hostpci: dict[str, Any] = schema().formats["pve-qm-hostpci"]
    assert hostpci["host"].default_key and hostpci["host"].optional
    assert hostpci["pcie"].type == "boolean"
    assert hostpci["driver"].enum == ("vfio", "keep")
    tfa = schema().formats["pve-tfa-config"]
    assert tfa["type"].optional is False


def test_the_gateway_never_reads_the_shared_fixture():
    gateway = ROOT / "services" / "gateway" / "rucher" / "gateway"
    sources = [path.read_text() for path in gateway.rglob("*.py")]
    assert SCHEMA_FILE.exists()
    assert not any("fixtures/pve-api" in text or "apidata" in text for text in sources)
