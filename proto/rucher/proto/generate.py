"""Generate the contract artefacts: JSON Schemas, the AsyncAPI document, schema fingerprints.

``python -m rucher.proto.generate`` rewrites ``proto/schemas/`` and ``proto/asyncapi.yaml``;
``--check`` only compares and exits non-zero naming what is stale; ``--update-fingerprints``
also rewrites ``proto/fingerprints.json``, which pins every contract's wire schema so that a
change to a contract is always a deliberate act, never a side effect of regenerating.
Output is byte-identical across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import tomllib
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec

from rucher.proto import catalog
from rucher.proto.base import Command, Event, Kind, Reply, RpcSubject, Subject
from rucher.proto.common import Query
from rucher.proto.errors import ErrorReply
from rucher.proto.streams import BUCKET_FAMILIES, BUCKETS, OBJECT_STORES, STREAMS, StreamDef

PROTO_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = "schemas"
ASYNCAPI = "asyncapi.yaml"
FINGERPRINTS = "fingerprints.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
REGENERATE = "python -m rucher.proto.generate"

# Keywords that document a schema without changing what is valid on the wire.
_ANNOTATIONS = frozenset({"title", "description", "examples", "$comment"})
# Keywords whose value maps names (not keywords) to schemas.
_NAMED = frozenset({"properties", "patternProperties", "$defs"})

PARAMETERS: dict[str, str] = {
    "node": "A node name. Events: the node that published the event. Requests and commands: "
    "the node whose agent must handle them.",
    "upid": "A task's UPID, encoded as one token by rucher.proto.keys.encode_token.",
    "inbox": "The requester's private inbox suffix (core NATS request/reply).",
}


# JSON Schemas ---------------------------------------------------------------------------------


def _dump_json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def message_schema(cls: type[msgspec.Struct]) -> dict[str, Any]:
    """The standalone JSON Schema of one message or record."""
    return {"$schema": JSON_SCHEMA_DIALECT, **msgspec.json.schema(cls)}


def schema_path(cls: type[msgspec.Struct]) -> str:
    """Where a contract's schema lives, relative to ``proto/``."""
    if catalog.is_message(cls):
        return f"{SCHEMAS}/{catalog.tag_of(cls)}.json"
    return f"{SCHEMAS}/records/{catalog.record_name(cls)}.json"


def render_schemas() -> dict[str, bytes]:
    """Every message's and record's schema file."""
    return {
        schema_path(cls): _dump_json(message_schema(cls))
        for cls in (*catalog.MESSAGES, *catalog.RECORDS)
    }


# Fingerprints --------------------------------------------------------------------------------


def _canonical(node: Any, defs: dict[str, Any], seen: frozenset[str]) -> Any:
    """The schema with references inlined and documentation dropped: only what the wire sees."""
    if isinstance(node, list):
        return [_canonical(item, defs, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        rest = {key: value for key, value in node.items() if key != "$ref"}
        if name in seen:  # a recursive type: keep the reference by name
            return {"$ref": name, **_canonical(rest, defs, seen)}
        return {**_canonical(defs[name], defs, seen | {name}), **_canonical(rest, defs, seen)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _ANNOTATIONS or key == "$defs":
            continue
        if key in _NAMED:
            out[key] = {name: _canonical(sub, defs, seen) for name, sub in value.items()}
        else:
            out[key] = _canonical(value, defs, seen)
    return out


def fingerprint(cls: type[msgspec.Struct]) -> str:
    """SHA-256 of a contract's canonical wire schema: docstrings and Python names do not count."""
    schema = msgspec.json.schema(cls)
    canonical = _canonical(schema, schema.get("$defs", {}), frozenset())
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _subject_signature(subject: Subject[msgspec.Struct]) -> str:
    signature = (
        f"{subject.kind.value} {subject.scope.value} {catalog.contract_name(subject.payload)}"
    )
    if isinstance(subject, RpcSubject):
        signature += f" -> {catalog.contract_name(subject.reply)}"
    return signature


def fingerprints() -> dict[str, dict[str, str]]:
    """Every message's, record's and subject's fingerprint."""
    return {
        "messages": {catalog.tag_of(cls): fingerprint(cls) for cls in catalog.MESSAGES},
        "records": {catalog.record_name(cls): fingerprint(cls) for cls in catalog.RECORDS},
        "subjects": {subject.pattern: _subject_signature(subject) for subject in catalog.SUBJECTS},
    }


def render_fingerprints() -> bytes:
    """The fingerprint file's content."""
    return _dump_json(fingerprints())


def fingerprint_drift(committed: dict[str, dict[str, str]]) -> list[str]:
    """What differs between the committed fingerprints and the contracts, one line each."""
    current = fingerprints()
    lines = []
    for section in sorted(current.keys() | committed.keys()):
        now, then = current.get(section, {}), committed.get(section, {})
        for name in sorted(now.keys() | then.keys()):
            if name not in then:
                lines.append(f"{section} {name}: new, has no fingerprint yet")
            elif name not in now:
                lines.append(f"{section} {name}: removed (a breaking change)")
            elif now[name] != then[name]:
                lines.append(f"{section} {name}: changed")
    return lines


# AsyncAPI ------------------------------------------------------------------------------------


def channel_id(subject: Subject[msgspec.Struct]) -> str:
    """A channel's id: its subject pattern without the placeholder braces."""
    return re.sub(r"\{(\w+)\}", r"\1", subject.pattern)


def _context(subject: Subject[msgspec.Struct]) -> str:
    if subject.kind is Kind.TASKLOG:
        return "task"
    return subject.pattern.split(".")[1]


def _role(cls: type[msgspec.Struct]) -> str:
    roles: tuple[tuple[type, str], ...] = (
        (Command, "command"),
        (Query, "query"),
        (Event, "event"),
        (Reply, "reply"),
        (ErrorReply, "error"),
    )
    return next((role for kind, role in roles if issubclass(cls, kind)), "record")


def _doc(cls: type) -> tuple[str, str]:
    doc = (cls.__doc__ or "").strip()
    summary = doc.split("\n\n", 1)[0].replace("\n", " ")
    return summary, doc


def _token_match(filter_tokens: list[str], tokens: list[str]) -> bool:
    """Whether a stream filter captures every subject a pattern (``*`` per parameter) can be."""
    for position, wanted in enumerate(filter_tokens):
        if wanted == ">":
            return len(tokens) > position
        if position >= len(tokens):
            return False
        if wanted != "*" and wanted != tokens[position]:
            return False
    return len(filter_tokens) == len(tokens)


def streams_capturing(subject: Subject[msgspec.Struct]) -> list[StreamDef]:
    """The streams whose subject filters store this subject."""
    tokens = subject.wildcard().split(".")
    return [
        stream
        for stream in STREAMS
        if any(_token_match(pattern.split("."), tokens) for pattern in stream.subjects)
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)}


def _message_component(cls: type[msgspec.Struct], payload: dict[str, Any]) -> dict[str, Any]:
    summary, doc = _doc(cls)
    component: dict[str, Any] = {
        "name": cls.__name__,
        "title": catalog.contract_name(cls),
        "summary": summary,
    }
    if doc != summary:
        component["description"] = doc
    component["payload"] = {"schemaFormat": SCHEMA_FORMAT, "schema": payload}
    component["x-rucher-role"] = _role(cls)
    return component


def _parameters(names: Iterable[str]) -> dict[str, Any]:
    return {name: _ref("components", "parameters", name) for name in names}


def _channels_and_operations(
    used: dict[str, type[msgspec.Struct]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for subject in catalog.SUBJECTS:
        cid = channel_id(subject)
        key = catalog.contract_name(subject.payload)
        used[key] = subject.payload
        streams = streams_capturing(subject)
        channel: dict[str, Any] = {"address": subject.pattern, "summary": subject.summary}
        channel["messages"] = {key: _ref("components", "messages", key)}
        if subject.params:
            channel["parameters"] = _parameters(subject.params)
        channel["x-rucher-kind"] = subject.kind.value
        channel["x-rucher-scope"] = subject.scope.value
        if streams:
            channel["x-rucher-stream"] = streams[0].name
        channels[cid] = channel

        # The owning service receives requests and commands and sends events and task logs.
        action = "receive" if subject.kind in (Kind.RPC, Kind.COMMAND) else "send"
        operation: dict[str, Any] = {
            "action": action,
            "channel": _ref("channels", cid),
            "summary": subject.summary,
            "messages": [_ref("channels", cid, "messages", key)],
            "tags": [{"name": _context(subject)}],
        }
        if isinstance(subject, RpcSubject):
            reply_id = f"{cid}.reply"
            reply_key = catalog.contract_name(subject.reply)
            used[reply_key] = subject.reply
            channels[reply_id] = {
                "address": "_INBOX.{inbox}",
                "summary": f"Replies to {subject.pattern}: the result, or an error reply.",
                "messages": {
                    reply_key: _ref("components", "messages", reply_key),
                    "error": _ref("components", "messages", "error"),
                },
                "parameters": _parameters(["inbox"]),
                "x-rucher-kind": "reply",
            }
            operation["reply"] = {
                "channel": _ref("channels", reply_id),
                "messages": [
                    _ref("channels", reply_id, "messages", reply_key),
                    _ref("channels", reply_id, "messages", "error"),
                ],
            }
        operations[f"{action}.{cid}"] = operation
    return channels, operations


def _proto_version() -> str:
    pyproject = PROTO_ROOT / "pyproject.toml"
    with pyproject.open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of every subject, message, stream and bucket."""
    contracts = (*catalog.MESSAGES, *catalog.RECORDS)
    payloads, schemas = msgspec.json.schema_components(
        contracts, ref_template="#/components/schemas/{name}"
    )
    payload_of = dict(zip(contracts, payloads, strict=True))
    used: dict[str, type[msgspec.Struct]] = {"error": ErrorReply}
    channels, operations = _channels_and_operations(used)
    for cls in catalog.MESSAGES:  # messages on no subject of their own (nested, future use)
        used.setdefault(catalog.tag_of(cls), cls)
    messages = {key: _message_component(used[key], payload_of[used[key]]) for key in sorted(used)}
    parameter_names = sorted({name for subject in catalog.SUBJECTS for name in subject.params})
    parameters = {name: {"description": PARAMETERS[name]} for name in [*parameter_names, "inbox"]}

    buckets = []
    for bucket in (*BUCKETS, *BUCKET_FAMILIES):
        entry = _plain(dataclasses.asdict(bucket))
        value = catalog.BUCKET_VALUES.get(bucket.name)
        if value is not None:
            entry["value"] = payload_of[value]
        buckets.append(entry)

    document = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Rucher bus",
            "version": _proto_version(),
            "description": "Every subject, message, stream and KV bucket of Rucher's NATS bus. "
            f"Generated from rucher.proto by `{REGENERATE}`; do not edit.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "Any server of the cluster's NATS (JetStream) cluster.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {name: schemas[name] for name in sorted(schemas)},
            "messages": messages,
            "parameters": parameters,
        },
        "x-rucher-streams": [_plain(dataclasses.asdict(stream)) for stream in STREAMS],
        "x-rucher-buckets": buckets,
        "x-rucher-object-stores": [_plain(dataclasses.asdict(store)) for store in OBJECT_STORES],
    }
    # Schema defaults hold Python values (tuples, enums): keep only what JSON can say.
    normalized: dict[str, Any] = json.loads(json.dumps(document))
    return normalized


# A plain scalar needs no quotes when it cannot be read as anything but this string.
_PLAIN = re.compile(r"^[A-Za-z_$]([A-Za-z0-9_$.\-/ ,;()']*[A-Za-z0-9_$.\-/;()'])?$")
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def _yaml_string(value: str) -> str:
    if _PLAIN.match(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML quoted scalar


def _yaml_float(value: float) -> str:
    mantissa, _, exponent = repr(value).partition("e")
    if "." not in mantissa:  # YAML 1.1 reads a float only with a dot in it
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        return _yaml_string(value)
    if isinstance(value, float):
        return _yaml_float(value)
    if value is None or isinstance(value, bool | int) or value in ({}, []):
        return json.dumps(value)  # null, true, false, integers, {} and [] read the same in YAML
    raise TypeError(f"cannot write {value!r} as YAML")


def _yaml_lines(value: Any) -> list[str]:
    """Block-style YAML for JSON-like data; the shapes generate.py produces, nothing more."""
    if isinstance(value, dict) and value:
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{_yaml_scalar(key)}:")
                lines.extend(f"  {line}" for line in _yaml_lines(item))
            else:
                lines.append(f"{_yaml_scalar(key)}: {_yaml_scalar(item)}")
        return lines
    if isinstance(value, list) and value:
        lines = []
        for item in value:
            first, *rest = _yaml_lines(item)
            lines.append(f"- {first}")
            lines.extend(f"  {line}" for line in rest)
        return lines
    return [_yaml_scalar(value)]


def to_yaml(value: Any) -> str:
    """Deterministic block-style YAML for JSON-like data (dicts keep their order)."""
    return "\n".join(_yaml_lines(value)) + "\n"


def render_asyncapi() -> bytes:
    """The AsyncAPI document as YAML."""
    header = f"# Generated by `{REGENERATE}` from rucher.proto; do not edit.\n"
    return (header + to_yaml(asyncapi_document())).encode()


# Files ---------------------------------------------------------------------------------------


def render() -> dict[str, bytes]:
    """Every generated file but the fingerprints, by path relative to ``proto/``."""
    return {**render_schemas(), ASYNCAPI: render_asyncapi()}


def stale(root: Path, expected: dict[str, bytes]) -> list[str]:
    """Generated files under ``root`` that are missing, differ, or should not exist."""
    lines = []
    for path, content in sorted(expected.items()):
        target = root / path
        if not target.exists():
            lines.append(f"missing {path}")
        elif target.read_bytes() != content:
            lines.append(f"stale {path}")
    schema_dir = root / SCHEMAS
    if schema_dir.exists():
        for found in sorted(schema_dir.rglob("*.json")):
            relative = found.relative_to(root).as_posix()
            if relative not in expected:
                lines.append(f"unexpected {relative}")
    return lines


def write(root: Path, expected: dict[str, bytes]) -> list[str]:
    """Bring the generated files under ``root`` up to date; returns what changed."""
    changes = stale(root, expected)
    for line in changes:
        state, path = line.split(" ", 1)
        target = root / path
        if state == "unexpected":
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(expected[path])
    return changes


def _committed_fingerprints(root: Path) -> dict[str, dict[str, str]]:
    path = root / FINGERPRINTS
    if not path.exists():
        return {}
    data: dict[str, dict[str, str]] = json.loads(path.read_text())
    return data


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m rucher.proto.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    parser.add_argument(
        "--update-fingerprints",
        action="store_true",
        help="also rewrite fingerprints.json (after checking the change is additive)",
    )
    parser.add_argument("--root", type=Path, default=PROTO_ROOT, help="the proto/ folder")
    args = parser.parse_args(argv)
    root: Path = args.root
    expected = render()
    drift = fingerprint_drift(_committed_fingerprints(root))
    out = sys.stdout

    if args.check:
        problems = stale(root, expected)
        for line in problems:
            out.write(f"{line}\n")
        if problems:
            out.write(f"generated contract files are stale: run `{REGENERATE}`\n")
        for line in drift:
            out.write(f"fingerprint {line}\n")
        if drift:
            out.write(
                "contract schemas differ from fingerprints.json: if the change is deliberate "
                f"and additive, run `{REGENERATE} --update-fingerprints`\n"
            )
        return 1 if problems or drift else 0

    verbs = {"missing": "wrote", "stale": "updated", "unexpected": "removed"}
    for line in write(root, expected):
        state, path = line.split(" ", 1)
        out.write(f"{verbs[state]} {path}\n")
    if args.update_fingerprints:
        for line in drift:
            out.write(f"fingerprint {line}\n")
        (root / FINGERPRINTS).write_bytes(render_fingerprints())
    elif drift:
        for line in drift:
            sys.stderr.write(f"fingerprint {line}\n")
        sys.stderr.write(
            "fingerprints.json was left as it is: pass --update-fingerprints to accept\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
