"""The contracts: generated files up to date, fingerprints pinned, naming rules, AsyncAPI sanity."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import yaml

from rucher.proto import catalog, generate
from rucher.proto.base import Command, Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.common import Query
from rucher.proto.errors import ErrorReply
from rucher.proto.streams import BUCKET_FAMILIES, BUCKETS, STREAMS

REGENERATE = "python -m rucher.proto.generate"

TAG = re.compile(r"^[a-z][a-z0-9]*(\.[a-z][a-z0-9_]*)+$")
SUBJECT_SCHEME = {
    Kind.RPC: re.compile(r"^rpc\.[a-z][a-z0-9]*\.[a-z][a-z0-9_]*(\.\{node\})?$"),
    Kind.COMMAND: re.compile(r"^cmd\.[a-z][a-z0-9]*\.[a-z][a-z0-9_]*(\.\{node\})?$"),
    Kind.EVENT: re.compile(r"^evt\.[a-z][a-z0-9]*\.[a-z][a-z0-9_]*\.\{node\}$"),
    Kind.TASKLOG: re.compile(r"^tasklog\.\{node\}\.\{upid\}$"),
}
# Past participles that do not end in -ed.
IRREGULAR_PAST = {"left", "found", "lost", "sent", "built", "taken", "begun", "done"}


def _messages_of(kind: type) -> list[type[msgspec.Struct]]:
    return [cls for cls in catalog.MESSAGES if issubclass(cls, kind)]


# Generated files ------------------------------------------------------------------------------


def test_generated_files_are_up_to_date() -> None:
    problems = generate.stale(generate.PROTO_ROOT, generate.render())
    assert not problems, (
        "generated contract files are stale; run `"
        + REGENERATE
        + "` and commit the result:\n  "
        + "\n  ".join(problems)
    )


def test_generation_is_deterministic() -> None:
    assert generate.render() == generate.render()
    assert generate.render_fingerprints() == generate.render_fingerprints()


def test_fingerprints_pin_every_contract() -> None:
    path = generate.PROTO_ROOT / generate.FINGERPRINTS
    committed = json.loads(path.read_text())
    drift = generate.fingerprint_drift(committed)
    assert not drift, (
        "contracts differ from proto/fingerprints.json:\n  "
        + "\n  ".join(drift)
        + "\nA wire contract changed. Evolve additively (new optional fields with defaults; a "
        "breaking change is a new message and subject), then accept it with `"
        + REGENERATE
        + " --update-fingerprints`."
    )
    assert path.read_bytes() == generate.render_fingerprints(), (
        f"fingerprints.json is not in its generated form; run `{REGENERATE} --update-fingerprints`"
    )


class _Before(msgspec.Struct, frozen=True, kw_only=True, tag="x.thing", tag_field="type"):
    """Documentation one way."""

    vmid: int
    name: str = ""


class _Redocumented(msgspec.Struct, frozen=True, kw_only=True, tag="x.thing", tag_field="type"):
    """Documentation another way, and a different class name."""

    vmid: int
    name: str = ""


class _NewField(msgspec.Struct, frozen=True, kw_only=True, tag="x.thing", tag_field="type"):
    """A field was added."""

    vmid: int
    name: str = ""
    extra: bool = False


class _NewType(msgspec.Struct, frozen=True, kw_only=True, tag="x.thing", tag_field="type"):
    """A field changed type."""

    vmid: str
    name: str = ""


class _NewDefault(msgspec.Struct, frozen=True, kw_only=True, tag="x.thing", tag_field="type"):
    """A default changed."""

    vmid: int
    name: str = "x"


def test_fingerprint_sees_the_wire_and_ignores_documentation() -> None:
    before = generate.fingerprint(_Before)
    assert generate.fingerprint(_Redocumented) == before
    for changed in (_NewField, _NewType, _NewDefault):
        assert generate.fingerprint(changed) != before, changed.__name__


def test_check_mode_names_what_is_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    assert "missing asyncapi.yaml" in capsys.readouterr().out

    assert generate.main(["--root", str(tmp_path), "--update-fingerprints"]) == 0
    capsys.readouterr()
    assert generate.main(["--check", "--root", str(tmp_path)]) == 0

    (tmp_path / "schemas" / "compute.guest.start.json").write_text("{}\n")
    (tmp_path / "schemas" / "compute.guest.gone.json").write_text("{}\n")
    fingerprints = json.loads((tmp_path / generate.FINGERPRINTS).read_text())
    fingerprints["messages"]["compute.guest.stop"] = "0" * 64
    (tmp_path / generate.FINGERPRINTS).write_text(json.dumps(fingerprints))
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "stale schemas/compute.guest.start.json" in out
    assert "unexpected schemas/compute.guest.gone.json" in out
    assert "fingerprint messages compute.guest.stop: changed" in out
    assert REGENERATE in out

    # Regenerating repairs the files but leaves the fingerprints to a deliberate act.
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert not (tmp_path / "schemas" / "compute.guest.gone.json").exists()
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    assert generate.main(["--root", str(tmp_path), "--update-fingerprints"]) == 0
    assert generate.main(["--check", "--root", str(tmp_path)]) == 0


# Messages -------------------------------------------------------------------------------------


def test_every_tag_is_unique_dotted_and_in_its_module() -> None:
    tags = [catalog.tag_of(cls) for cls in catalog.MESSAGES]
    assert len(tags) == len(set(tags))
    for cls in catalog.MESSAGES:
        tag = catalog.tag_of(cls)
        if cls is ErrorReply:
            assert tag == "error"
            continue
        assert TAG.match(tag), f"{cls.__qualname__}: tag {tag!r} is not a dotted context.name"
        assert tag.split(".")[0] == catalog.short_module(cls), f"{tag} lives in {cls.__module__}"


def test_all_messages_form_one_tagged_union() -> None:
    union: Any = None
    for cls in catalog.MESSAGES:
        union = cls if union is None else union | cls
    msgspec.json.Decoder(union)  # refuses duplicate tags or mixed tag fields


def test_every_message_is_exactly_one_kind() -> None:
    kinds = (Command, Query, Event, Reply, ErrorReply)
    for cls in catalog.MESSAGES:
        matching = [kind.__name__ for kind in kinds if issubclass(cls, kind)]
        assert len(matching) == 1, f"{cls.__qualname__} is {matching}"


def test_events_are_past_tense() -> None:
    for cls in _messages_of(Event):
        word = catalog.tag_of(cls).rsplit(".", 1)[-1].rsplit("_", 1)[-1]
        assert word.endswith("ed") or word in IRREGULAR_PAST, catalog.tag_of(cls)


@pytest.mark.parametrize("cls", [*catalog.MESSAGES, *catalog.RECORDS], ids=catalog.contract_name)
def test_contract_struct_shape(cls: type[msgspec.Struct]) -> None:
    assert cls.__struct_config__.frozen, "contracts are frozen"
    parameters = inspect.signature(cls).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), "kw_only"
    doc = inspect.getdoc(cls) or ""
    summary = doc.split("\n\n", 1)[0]
    assert summary and "\n" not in summary and summary.endswith("."), (
        f"{cls.__qualname__} needs a one-line summary docstring"
    )


def _walk(t: mi.Type) -> list[mi.Type]:
    found = [t]
    children: list[mi.Type] = []
    if isinstance(t, mi.Metadata):
        children = [t.type]
    elif isinstance(t, mi.UnionType):
        children = list(t.types)
    elif isinstance(t, mi.CollectionType):
        children = [t.item_type]
    elif isinstance(t, mi.TupleType):
        children = list(t.item_types)
    elif isinstance(t, mi.DictType):
        children = [t.key_type, t.value_type]
    for child in children:
        found += _walk(child)
    return found


def test_field_types_are_precise() -> None:
    for cls in (*catalog.MESSAGES, *catalog.RECORDS):
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        for field in info.fields:
            for t in _walk(field.type):
                where = f"{cls.__qualname__}.{field.name}"
                if isinstance(t, mi.EnumType):
                    assert issubclass(t.cls, str), f"{where}: enumerations are StrEnums"
                if isinstance(t, mi.AnyType):
                    assert (cls, field.name) == (ErrorReply, "details"), f"{where} is Any"


def test_optional_fields_have_defaults() -> None:
    for cls in (*catalog.MESSAGES, *catalog.RECORDS):
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        for field in info.fields:
            types = field.type.types if isinstance(field.type, mi.UnionType) else ()
            if any(isinstance(t, mi.NoneType) for t in types):
                assert not field.required, (
                    f"{cls.__qualname__}.{field.name} may be None: default it"
                )


def test_contract_class_names_are_unique() -> None:
    names = [cls.__name__ for cls in (*catalog.MESSAGES, *catalog.RECORDS)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"AsyncAPI component names must be unique: {duplicates}"


# Subjects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", catalog.SUBJECTS, ids=lambda subject: subject.pattern)
def test_subject_follows_the_naming_scheme(subject: Subject[msgspec.Struct]) -> None:
    assert SUBJECT_SCHEME[subject.kind].match(subject.pattern), subject.pattern
    assert ("node" in subject.params) == (subject.scope is Scope.NODE)
    assert subject.summary.strip()
    payload = subject.payload
    if subject.kind is Kind.TASKLOG:
        assert not catalog.is_message(payload)
        return
    expected_payload: dict[Kind, type | tuple[type, ...]] = {
        Kind.EVENT: Event,
        Kind.COMMAND: Command,
        Kind.RPC: (Command, Query),
    }
    assert issubclass(payload, expected_payload[subject.kind])
    assert isinstance(subject, RpcSubject) == (subject.kind is Kind.RPC)
    if isinstance(subject, RpcSubject):
        assert issubclass(subject.reply, Reply)
    # The subject is the payload's tag: context, then the rest with dots as underscores.
    context, rest = catalog.tag_of(payload).split(".", 1)
    expected = f"{subject.kind.value}.{context}.{rest.replace('.', '_')}"
    if subject.scope is Scope.NODE:
        expected += ".{node}"
    assert subject.pattern == expected


def test_every_subject_is_a_catalogued_module_constant() -> None:
    catalogued = {subject.pattern for subject in catalog.SUBJECTS}
    contexts = {module.__name__.rsplit(".", 1)[-1] for module in catalog.MODULES}
    # Other tests may register throwaway subjects; only a contract context's subjects count.
    strays = [
        pattern
        for pattern in Subject.registry
        if pattern.split(".")[1] in contexts and pattern not in catalogued
    ]
    assert not strays, f"subjects defined outside a contract module constant: {strays}"


def test_every_request_and_event_has_a_subject_and_every_reply_a_request() -> None:
    payloads = {subject.payload for subject in catalog.SUBJECTS}
    replies = {subject.reply for subject in catalog.SUBJECTS if isinstance(subject, RpcSubject)}
    for cls in catalog.MESSAGES:
        if issubclass(cls, Command | Query | Event):
            assert cls in payloads, f"{catalog.tag_of(cls)} travels on no subject"
        if issubclass(cls, Reply):
            assert cls in replies, f"{catalog.tag_of(cls)} answers no request"


def test_streams_store_commands_events_and_logs_but_never_requests() -> None:
    expected = {Kind.EVENT: "EVENTS", Kind.COMMAND: "COMMANDS", Kind.TASKLOG: "TASKLOG"}
    for subject in catalog.SUBJECTS:
        names = [stream.name for stream in generate.streams_capturing(subject)]
        if subject.kind is Kind.RPC:
            assert names == [], f"{subject.pattern} would be swallowed by {names}"
        else:
            assert names == [expected[subject.kind]], subject.pattern


def test_every_bucket_value_is_a_record() -> None:
    assert set(catalog.BUCKET_VALUES) <= {bucket.name for bucket in (*BUCKETS, *BUCKET_FAMILIES)}
    assert set(catalog.BUCKET_VALUES.values()) <= set(catalog.RECORDS)


# AsyncAPI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    path = generate.PROTO_ROOT / generate.ASYNCAPI
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references: {ref}"
    node: Any = document
    for raw in ref[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_asyncapi_header(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["info"]["title"] and asyncapi["info"]["version"]
    assert asyncapi["defaultContentType"] == "application/json"
    assert asyncapi["servers"]["nats"]["protocol"] == "nats"
    assert asyncapi["servers"]["nats"]["host"]


def test_asyncapi_every_reference_resolves(asyncapi: dict[str, Any]) -> None:
    refs = _refs(asyncapi)
    assert len(refs) > 500
    for ref in sorted(set(refs)):
        _resolve(asyncapi, ref)


def test_asyncapi_ids_are_valid_keys(asyncapi: dict[str, Any]) -> None:
    key = re.compile(r"^[a-zA-Z0-9.\-_]+$")
    for section in (asyncapi["channels"], asyncapi["operations"]):
        assert all(key.match(name) for name in section)
    for section in asyncapi["components"].values():
        assert all(key.match(name) for name in section)


def test_asyncapi_channels(asyncapi: dict[str, Any]) -> None:
    channels = asyncapi["channels"]
    rpc = [subject for subject in catalog.SUBJECTS if isinstance(subject, RpcSubject)]
    assert len(channels) == len(catalog.SUBJECTS) + len(rpc)
    addresses = {channel["address"] for channel in channels.values()}
    assert {subject.pattern for subject in catalog.SUBJECTS} <= addresses
    for name, channel in channels.items():
        params = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert params == set(channel.get("parameters", {})), name
        assert channel["messages"], name
        for message in channel["messages"].values():
            assert message["$ref"].startswith("#/components/messages/"), name
            assert "payload" in _resolve(asyncapi, message["$ref"])


def test_asyncapi_operations(asyncapi: dict[str, Any]) -> None:
    operations = asyncapi["operations"]
    assert len(operations) == len(catalog.SUBJECTS)
    rpc_addresses = {s.pattern for s in catalog.SUBJECTS if isinstance(s, RpcSubject)}
    for name, operation in operations.items():
        assert operation["action"] in ("send", "receive"), name
        channel_ref = operation["channel"]["$ref"]
        channel = _resolve(asyncapi, channel_ref)
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
        if channel["address"] not in rpc_addresses:
            assert "reply" not in operation, name
            continue
        reply = operation["reply"]
        reply_ref = reply["channel"]["$ref"]
        assert _resolve(asyncapi, reply_ref)["address"].startswith("_INBOX."), name
        keys = [message["$ref"].rsplit("/", 1)[-1] for message in reply["messages"]]
        assert "error" in keys and len(keys) == 2, name
        for message in reply["messages"]:
            assert message["$ref"].startswith(reply_ref + "/messages/"), name


def test_asyncapi_messages_cover_every_contract(asyncapi: dict[str, Any]) -> None:
    messages = asyncapi["components"]["messages"]
    assert {catalog.tag_of(cls) for cls in catalog.MESSAGES} <= set(messages)
    schemas = asyncapi["components"]["schemas"]
    assert {cls.__name__ for cls in (*catalog.MESSAGES, *catalog.RECORDS)} <= set(schemas)


def test_asyncapi_streams_and_buckets(asyncapi: dict[str, Any]) -> None:
    streams = asyncapi["x-rucher-streams"]
    assert [stream["name"] for stream in streams] == [stream.name for stream in STREAMS]
    for entry, definition in zip(streams, STREAMS, strict=True):
        assert set(entry) == {field.name for field in dataclasses.fields(definition)}
        assert entry["subjects"] == list(definition.subjects)
        assert entry["retention"] == definition.retention.value
    buckets = asyncapi["x-rucher-buckets"]
    documented = (*BUCKETS, *BUCKET_FAMILIES)
    assert [bucket["name"] for bucket in buckets] == [bucket.name for bucket in documented]
    for entry, bucket in zip(buckets, documented, strict=True):
        fields = {field.name for field in dataclasses.fields(bucket)}
        assert fields <= set(entry) <= fields | {"value"}
        assert entry["history"] == bucket.history


# The YAML writer ------------------------------------------------------------------------------


def test_yaml_writer_reads_back_as_written() -> None:
    tricky = {
        "plain": "compute.guest.start",
        "words": ["yes", "No", "on", "null", "true", "~", "", " padded ", "a: b", "#x", "- x"],
        "numbers": [0, -3, 1.5, 60.0, 1e-05, 2e20, "3.0.0", "0x1f", "1e3"],
        "nested": [{"a": [], "b": {}}, [1, [2]], {"c": {"d": None}}],
        "unicode": "vérifié — ✓",
        "escapes": 'line\nbreak\t"quoted" \\ \x01',
        "$ref": "#/components/messages/x",
    }
    assert yaml.safe_load(generate.to_yaml(tricky)) == tricky
    document = generate.asyncapi_document()
    assert yaml.safe_load(generate.render_asyncapi()) == document
