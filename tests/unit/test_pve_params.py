"""Request parameters checked against the Proxmox schema: types, ranges, formats, sources."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rucher.pve.params import (
    BAD_UTF8,
    DUPLICATE,
    MISSING,
    UNKNOWN,
    ParamError,
    merge,
    parse_json,
    parse_urlencoded,
    validate,
)
from rucher.pve.schema import Param, ParamsSpec
from rucher.pve.values import MAX_STRING

from .pve_fixtures import schema


def _check(method: str, path: str, **raw):
    endpoint = schema().endpoint(method, path)
    return validate(endpoint.parameters, raw, formats=schema().formats)


def _errors(method: str, path: str, **raw) -> dict[str, str]:
    with pytest.raises(ParamError) as caught:
        _check(method, path, **raw)
    return caught.value.errors


TASKS = ("GET", "/nodes/{node}/tasks")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("0", False), ("true", True), ("False", False), ("yes", True), ("off", False)],
)
def test_booleans_arrive_as_text_in_every_proxmox_spelling(text, expected):
    assert _check(*TASKS, node="n1", errors=text)["errors"] is expected


def test_booleans_and_integers_also_arrive_as_json_scalars():
    params = _check(*TASKS, node="n1", errors=True, limit=5)
    assert (params["errors"], params["limit"]) == (True, 5)


def test_a_bad_boolean_names_the_field():
    assert _errors(*TASKS, node="n1", errors="maybe") == {
        "errors": "type check ('boolean') failed - got 'maybe'"
    }


def test_integers_are_typed_and_bounded():
    assert _check(*TASKS, node="n1", limit="20", start="0")["limit"] == 20
    assert _errors(*TASKS, node="n1", limit="-1") == {
        "limit": "value must have a minimum value of 0"
    }
    assert _errors(*TASKS, node="n1", limit="ten") == {
        "limit": "type check ('integer') failed - got 'ten'"
    }
    assert _errors(*TASKS, node="n1", vmid="99") == {
        "vmid": "value must have a minimum value of 100"
    }


@given(st.integers(min_value=100, max_value=999_999_999))
def test_every_valid_vmid_is_accepted(vmid):
    assert _check("GET", "/cluster/nextid", vmid=str(vmid))["vmid"] == vmid


@given(st.integers().filter(lambda n: not 100 <= n <= 999_999_999))
def test_every_vmid_out_of_range_is_refused(vmid):
    assert "vmid" in _errors("GET", "/cluster/nextid", vmid=str(vmid))


def test_enums_list_what_is_allowed():
    assert _errors("GET", "/cluster/resources", type="vms") == {
        "type": "value 'vms' does not have a value in the enumeration 'vm, storage, node, sdn'"
    }
    assert _check("GET", "/cluster/resources", type="vm")["type"] == "vm"


def test_missing_and_unknown_parameters_are_named():
    assert _errors(*TASKS, bogus="1") == {"node": MISSING, "bogus": UNKNOWN}


def test_several_bad_fields_are_reported_together():
    errors = _errors(*TASKS, node="bad_node!", limit="x", source="nowhere")
    assert set(errors) == {"node", "limit", "source"}
    assert errors["node"] == "value does not look like a valid node name"


def test_strings_longer_than_their_max_length_are_refused():
    long_id = "a" * 60 + "@pve"
    assert _errors("GET", "/access/users/{userid}", userid=long_id + "xxx") == {
        "userid": "value may only be 64 characters long"
    }


def test_strings_without_a_max_length_are_still_bounded():
    huge = "x" * (MAX_STRING + 1)
    assert _errors("POST", "/access/groups", groupid="ops", comment=huge) == {
        "comment": f"value may only be {MAX_STRING} characters long"
    }


@pytest.mark.parametrize(
    ("method", "path", "field", "good", "bad"),
    [
        ("GET", "/nodes/{node}/status", "node", "node-1", "-node"),
        ("GET", "/access/users/{userid}", "userid", "alice@pve", "alice"),
        ("GET", "/access/groups/{groupid}", "groupid", "ops.team", "ops team"),
        ("GET", "/access/roles/{roleid}", "roleid", "VMOperator", "VM/Operator"),
        ("GET", "/pools/{poolid}", "poolid", "prod_1", "prod/1"),
        ("GET", "/access/domains/{realm}", "realm", "corp", "1corp"),
        ("POST", "/access/users", "email", "alice@example.com", "alice@"),
        ("PUT", "/access/roles/{roleid}", "privs", "VM.Audit,Sys.Audit", "VM.Audit,bogus"),
        ("GET", "/nodes/{node}/tasks", "statusfilter", "ok,error", "ok,fine"),
    ],
)
def test_proxmox_formats(method, path, field, good, bad):
    endpoint = schema().endpoint(method, path)
    required = {
        name: _valid_sample(name)
        for name, param in endpoint.parameters.properties.items()
        if not param.optional and name != field
    }
    assert _check(method, path, **required, **{field: good})[field] == good
    assert field in _errors(method, path, **required, **{field: bad})


def _valid_sample(name: str) -> str:
    return {"node": "n1", "userid": "alice@pve", "roleid": "R", "groupid": "g", "poolid": "p"}[name]


def test_email_opt_allows_an_empty_value():
    assert _check("PUT", "/access/users/{userid}", userid="a@pve", email="")["email"] == ""


def test_user_and_token_ids():
    check = schema().endpoint("PUT", "/access/acl").parameters
    ok = validate(
        check,
        {"path": "/", "roles": "PVEAuditor", "tokens": "alice@pve!ci, bob@pam!t2"},
        formats=schema().formats,
    )
    assert ok["tokens"] == "alice@pve!ci, bob@pam!t2"
    with pytest.raises(ParamError) as caught:
        validate(check, {"path": "/", "roles": "PVEAuditor", "tokens": "alice@pve"}, formats={})
    assert caught.value.errors == {
        "tokens": "value 'alice@pve' does not look like a valid token ID"
    }


def test_property_string_parameters_are_parsed_with_their_format():
    base = {"realm": "corp", "type": "openid"}
    good = _check("POST", "/access/domains", **base, **{"sync-defaults-options": "scope=users"})
    assert good["sync-defaults-options"] == "scope=users"
    errors = _errors(
        "POST", "/access/domains", **base, **{"sync-defaults-options": "scope=all,full=2"}
    )
    assert errors["sync-defaults-options"].startswith("invalid format - ")
    assert "scope" in errors["sync-defaults-options"]
    assert "full" in errors["sync-defaults-options"]


def test_defaults_fill_in_for_values_not_given():
    params = _check(*TASKS, node="n1")
    assert (params["limit"], params["start"], params["source"]) == (50, 0, "archive")
    assert "limit" not in params and params.values == {"node": "n1"}


def test_indexed_parameters_match_their_family():
    spec = ParamsSpec(properties={"net[n]": Param(type="string", optional=True, max_length=8)})
    assert validate(spec, {"net0": "virtio", "net12": "e1000"}, formats={}).values == {
        "net0": "virtio",
        "net12": "e1000",
    }
    with pytest.raises(ParamError) as caught:
        validate(spec, {"netx": "virtio"}, formats={})
    assert caught.value.errors == {"netx": UNKNOWN}


def test_query_strings_decode_plus_and_percent_escapes():
    assert parse_urlencoded(b"userid=alice%40pve&comment=a+b%2Bc&empty=") == [
        ("userid", "alice@pve"),
        ("comment", "a b+c"),
        ("empty", ""),
    ]


def test_invalid_utf8_is_refused_naming_the_field():
    with pytest.raises(ParamError) as caught:
        parse_urlencoded(b"comment=%ff%fe&node=n1")
    assert caught.value.errors == {"comment": BAD_UTF8}
    with pytest.raises(ParamError) as caught:
        parse_json(b'{"comment": "\xff", "node": "n1"}')
    assert caught.value.errors == {"comment": BAD_UTF8}
    with pytest.raises(ParamError) as caught:
        parse_json(json.dumps({"comment": "\ud800"}).encode())
    assert caught.value.errors == {"comment": BAD_UTF8}


def test_json_bodies_keep_scalars_and_refuse_nesting():
    assert parse_json(b'{"a": 1, "b": true, "c": "x", "d": null}') == [
        ("a", 1),
        ("b", True),
        ("c", "x"),
    ]
    with pytest.raises(ParamError) as caught:
        parse_json(b'{"a": {"b": 1}}')
    assert set(caught.value.errors) == {"a"}
    with pytest.raises(ParamError, match="malformed JSON"):
        parse_json(b"{nope")
    with pytest.raises(ParamError, match="object"):
        parse_json(b"[1, 2]")


def test_a_field_given_twice_is_refused():
    with pytest.raises(ParamError) as caught:
        merge([("node", "n1")], parse_urlencoded(b"node=n2"))
    assert caught.value.errors == {"node": DUPLICATE}
    pairs = parse_urlencoded(b"a=1&a=2")
    with pytest.raises(ParamError) as caught:
        merge(pairs)
    assert caught.value.errors == {"a": DUPLICATE}
    with pytest.raises(ParamError) as caught:
        parse_json(b'{"a": 1, "a": 2}')
    assert caught.value.errors == {"a": DUPLICATE}


def test_requires_names_the_missing_partner():
    spec = ParamsSpec(
        properties={
            "a": Param(type="string", optional=True, requires="b"),
            "b": Param(type="string", optional=True),
        }
    )
    with pytest.raises(ParamError) as caught:
        validate(spec, {"a": "x"}, formats={})
    assert caught.value.errors == {"b": "missing property - 'a' requires this property"}
