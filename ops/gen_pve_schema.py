"""Extract the Proxmox API schema of the endpoints Rucher implements into the gateway's package.

Run: ops/gen-pve-schema [--apidata PATH] [--output PATH] [--check]

Reads Proxmox VE's generated API schema (``../shared/fixtures/pve-api/apidata.js``) and writes
``services/gateway/rucher/gateway/pve_schema.json``: for each implemented endpoint its path,
method, parameters (type, format, enum, range, length, pattern, default, optional), returns and
permissions (``user: world|all``, ``check`` clauses, ``allowtoken``), plus the definitions of the
Proxmox property-string formats Rucher parses (``net0=virtio,bridge=vmbr0``). Perl regexes become
Python ones; named property-string formats whose only definition is their ``typetext`` are turned
into sub-property schemas. The running gateway reads only the written file, never ../shared.
``--check`` exits 1 when the committed file differs from what this script would write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APIDATA = ROOT.parent / "shared" / "fixtures" / "pve-api" / "apidata.js"
OUTPUT = ROOT / "services" / "gateway" / "rucher" / "gateway" / "pve_schema.json"
PVE_RELEASE = "9.1"

# Every endpoint the gateway serves, as (method, path) in Proxmox's spelling.
ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("GET", "/version"),
    ("GET", "/nodes"),
    ("GET", "/nodes/{node}/status"),
    ("GET", "/nodes/{node}/tasks"),
    ("GET", "/nodes/{node}/tasks/{upid}"),
    ("DELETE", "/nodes/{node}/tasks/{upid}"),
    ("GET", "/nodes/{node}/tasks/{upid}/status"),
    ("GET", "/nodes/{node}/tasks/{upid}/log"),
    ("GET", "/nodes/{node}/qemu"),
    ("POST", "/nodes/{node}/qemu"),
    ("DELETE", "/nodes/{node}/qemu/{vmid}"),
    ("GET", "/nodes/{node}/qemu/{vmid}/config"),
    ("POST", "/nodes/{node}/qemu/{vmid}/config"),
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"),
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/reboot"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/reset"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/suspend"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/resume"),
    ("GET", "/nodes/{node}/qemu/{vmid}/snapshot"),
    ("POST", "/nodes/{node}/qemu/{vmid}/snapshot"),
    ("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}"),
    ("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}"),
    ("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config"),
    ("PUT", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config"),
    ("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback"),
    ("GET", "/nodes/{node}/qemu/{vmid}/pending"),
    ("POST", "/nodes/{node}/qemu/{vmid}/template"),
    ("POST", "/nodes/{node}/qemu/{vmid}/clone"),
    ("PUT", "/nodes/{node}/qemu/{vmid}/resize"),
    ("GET", "/nodes/{node}/qemu/{vmid}/migrate"),
    ("POST", "/nodes/{node}/qemu/{vmid}/migrate"),
    ("POST", "/nodes/{node}/qemu/{vmid}/termproxy"),
    ("GET", "/nodes/{node}/qemu/{vmid}/vncwebsocket"),
    ("GET", "/nodes/{node}/qemu/{vmid}/rrddata"),
    ("GET", "/storage"),
    ("POST", "/storage"),
    ("GET", "/storage/{storage}"),
    ("PUT", "/storage/{storage}"),
    ("DELETE", "/storage/{storage}"),
    ("GET", "/nodes/{node}/storage"),
    ("GET", "/nodes/{node}/storage/{storage}/status"),
    ("GET", "/nodes/{node}/storage/{storage}/content"),
    ("POST", "/nodes/{node}/storage/{storage}/content"),
    ("GET", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("PUT", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("POST", "/nodes/{node}/storage/{storage}/download-url"),
    ("POST", "/nodes/{node}/storage/{storage}/upload"),
    ("GET", "/cluster/status"),
    ("GET", "/cluster/resources"),
    ("GET", "/cluster/nextid"),
    ("GET", "/cluster/tasks"),
    ("GET", "/cluster/ha"),
    ("GET", "/cluster/ha/resources"),
    ("POST", "/cluster/ha/resources"),
    ("GET", "/cluster/ha/resources/{sid}"),
    ("PUT", "/cluster/ha/resources/{sid}"),
    ("DELETE", "/cluster/ha/resources/{sid}"),
    ("POST", "/cluster/ha/resources/{sid}/migrate"),
    ("POST", "/cluster/ha/resources/{sid}/relocate"),
    ("GET", "/cluster/ha/rules"),
    ("POST", "/cluster/ha/rules"),
    ("GET", "/cluster/ha/rules/{rule}"),
    ("PUT", "/cluster/ha/rules/{rule}"),
    ("DELETE", "/cluster/ha/rules/{rule}"),
    ("GET", "/cluster/ha/groups"),
    ("POST", "/cluster/ha/groups"),
    ("GET", "/cluster/ha/groups/{group}"),
    ("PUT", "/cluster/ha/groups/{group}"),
    ("DELETE", "/cluster/ha/groups/{group}"),
    ("GET", "/cluster/ha/status"),
    ("GET", "/cluster/ha/status/current"),
    ("GET", "/cluster/ha/status/manager_status"),
    ("POST", "/cluster/ha/status/disarm-ha"),
    ("POST", "/cluster/ha/status/arm-ha"),
    ("GET", "/cluster/mapping"),
    ("GET", "/cluster/mapping/pci"),
    ("POST", "/cluster/mapping/pci"),
    ("GET", "/cluster/mapping/pci/{id}"),
    ("PUT", "/cluster/mapping/pci/{id}"),
    ("DELETE", "/cluster/mapping/pci/{id}"),
    ("GET", "/nodes/{node}/hardware"),
    ("GET", "/nodes/{node}/hardware/pci"),
    ("GET", "/nodes/{node}/hardware/pci/{pci-id-or-mapping}"),
    ("GET", "/nodes/{node}/hardware/pci/{pci-id-or-mapping}/mdev"),
    ("GET", "/pools"),
    ("POST", "/pools"),
    ("GET", "/pools/{poolid}"),
    ("PUT", "/pools/{poolid}"),
    ("DELETE", "/pools/{poolid}"),
    ("GET", "/access"),
    ("GET", "/access/ticket"),
    ("POST", "/access/ticket"),
    ("PUT", "/access/password"),
    ("GET", "/access/permissions"),
    ("GET", "/access/users"),
    ("POST", "/access/users"),
    ("GET", "/access/users/{userid}"),
    ("PUT", "/access/users/{userid}"),
    ("DELETE", "/access/users/{userid}"),
    ("GET", "/access/users/{userid}/token"),
    ("GET", "/access/users/{userid}/token/{tokenid}"),
    ("POST", "/access/users/{userid}/token/{tokenid}"),
    ("PUT", "/access/users/{userid}/token/{tokenid}"),
    ("DELETE", "/access/users/{userid}/token/{tokenid}"),
    ("GET", "/access/groups"),
    ("POST", "/access/groups"),
    ("GET", "/access/groups/{groupid}"),
    ("PUT", "/access/groups/{groupid}"),
    ("DELETE", "/access/groups/{groupid}"),
    ("GET", "/access/roles"),
    ("POST", "/access/roles"),
    ("GET", "/access/roles/{roleid}"),
    ("PUT", "/access/roles/{roleid}"),
    ("DELETE", "/access/roles/{roleid}"),
    ("GET", "/access/acl"),
    ("PUT", "/access/acl"),
    ("GET", "/access/domains"),
    ("POST", "/access/domains"),
    ("GET", "/access/domains/{realm}"),
    ("PUT", "/access/domains/{realm}"),
    ("DELETE", "/access/domains/{realm}"),
    ("GET", "/access/tfa"),
    ("GET", "/access/tfa/{userid}"),
    ("POST", "/access/tfa/{userid}"),
    ("GET", "/access/tfa/{userid}/{id}"),
    ("PUT", "/access/tfa/{userid}/{id}"),
    ("DELETE", "/access/tfa/{userid}/{id}"),
    ("POST", "/access/openid/auth-url"),
    ("POST", "/access/openid/login"),
)

# Property-string formats exported beside the endpoints (guest config keys the compute and
# container services parse): exported name -> (method, path, parameter) holding the definition.
EXTRA_FORMATS: dict[str, tuple[str, str, str]] = {
    "qemu-net": ("POST", "/nodes/{node}/qemu", "net[n]"),
    "qemu-scsi": ("POST", "/nodes/{node}/qemu", "scsi[n]"),
    "pve-qm-ide": ("POST", "/nodes/{node}/qemu", "ide[n]"),
    "pve-startup-order": ("POST", "/nodes/{node}/qemu", "startup"),
    "pve-qm-hostpci": ("POST", "/nodes/{node}/qemu", "hostpci[n]"),
    "lxc-net": ("POST", "/nodes/{node}/lxc", "net[n]"),
    "lxc-rootfs": ("POST", "/nodes/{node}/lxc", "rootfs"),
}

# What a parameter, a sub-property or a return value keeps from Proxmox's schema.
PARAM_KEYS = (
    "type",
    "format",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "default",
    "optional",
    "description",
    "typetext",
    "format_description",
    "requires",
    "default_key",
    "alias",
    "keyAlias",
    "items",
    "properties",
    "additionalProperties",
)


def load_apidata(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Every (method, path) of the Proxmox schema with its ``info`` block."""
    text = path.read_text()
    tree = json.loads(text[text.index("[") : text.rindex("]") + 1])
    found: dict[tuple[str, str], dict[str, Any]] = {}

    def walk(node: dict[str, Any]) -> None:
        for method, info in node.get("info", {}).items():
            found[(method, node["path"])] = info
        for child in node.get("children", []):
            walk(child)

    for node in tree:
        walk(node)
    return found


def python_regex(pattern: str) -> str:
    """Proxmox patterns are Perl regexes: ``(?^:...)`` (default flags) becomes ``(?:...)``."""
    converted = re.sub(r"\(\?\^([a-z]*):", lambda m: f"(?{m[1]}:" if m[1] else "(?:", pattern)
    re.compile(converted)
    return converted


def clean(schema: dict[str, Any]) -> dict[str, Any]:
    """Keep what validation and documentation need; convert regexes and nested formats."""
    out: dict[str, Any] = {}
    for key in PARAM_KEYS:
        if key not in schema:
            continue
        value = schema[key]
        if key == "pattern":
            value = python_regex(value)
        elif key == "format" and isinstance(value, dict):
            value = {name: clean(sub) for name, sub in sorted(value.items())}
        elif key == "items" and isinstance(value, dict):
            value = clean(value)
        elif key == "properties":
            value = {name: clean(sub) for name, sub in sorted(value.items())}
        out[key] = value
    return out


_ITEM = re.compile(r"^(?:\[(?P<default>[\w-]+)=\]|(?P<key>[\w-]+)=)(?P<value>.*)$")


def split_typetext(typetext: str) -> list[str]:
    """Split a property string's typetext into its items at top-level spaces."""
    items: list[str] = []
    depth = 0
    current = ""
    for char in typetext.strip():
        if char in "[<":
            depth += 1
        elif char in "]>":
            depth -= 1
        if char == " " and depth == 0:
            if current:
                items.append(current)
            current = ""
            continue
        current += char
    if current:
        items.append(current)
    return items


def value_schema(text: str) -> dict[str, Any]:
    """The schema of one sub-property from its typetext value (``<1|0>``, ``<a|b>``, ``<N>``)."""
    inner = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if inner == "1|0":
        return {"type": "boolean"}
    if inner in {"integer", "N", r"\d+"}:
        return {"type": "integer"}
    alternatives = inner.split("|")
    enumerated = all(re.fullmatch(r"[\w./-]+", alt) for alt in alternatives)
    if text.startswith("<") and len(alternatives) > 1 and enumerated:
        return {"type": "string", "enum": alternatives}
    return {"type": "string", "format_description": inner}


def format_from_typetext(typetext: str) -> dict[str, Any]:
    """Sub-property schemas of a named property-string format, derived from its typetext."""
    properties: dict[str, Any] = {}
    for item in split_typetext(typetext):
        optional = item.startswith("[") and item.endswith("]")
        body = item[1:-1] if optional else item
        match = _ITEM.match(body.lstrip(","))
        if not match:
            raise ValueError(f"cannot read typetext item {item!r} of {typetext!r}")
        key = match["default"] or match["key"]
        schema = {**value_schema(match["value"]), "typetext": match["value"]}
        if match["default"]:
            schema["default_key"] = 1
        if optional:
            schema["optional"] = 1
        properties[key] = schema
    return dict(sorted(properties.items()))


def endpoint(method: str, path: str, info: dict[str, Any]) -> dict[str, Any]:
    """One endpoint's entry in the output."""
    parameters = info.get("parameters", {})
    return {
        "method": method,
        "path": path,
        "name": info.get("name", ""),
        "description": info.get("description", ""),
        "permissions": info.get("permissions", {}),
        "allowtoken": bool(info.get("allowtoken", 0)),
        "protected": bool(info.get("protected", 0)),
        "parameters": {
            "additionalProperties": bool(parameters.get("additionalProperties", 0)),
            "properties": {
                name: clean(prop) for name, prop in sorted(parameters.get("properties", {}).items())
            },
        },
        "returns": clean(info.get("returns", {})),
    }


def named_formats(endpoints: list[dict[str, Any]]) -> set[str]:
    """Named property-string formats the endpoints use (their typetext holds ``key=``)."""
    names: set[str] = set()
    for entry in endpoints:
        for prop in entry["parameters"]["properties"].values():
            fmt = prop.get("format")
            if isinstance(fmt, str) and "=<" in prop.get("typetext", ""):
                names.add(fmt)
    return names


def build(apidata: Path) -> dict[str, Any]:
    """The whole output document."""
    api = load_apidata(apidata)
    missing = [f"{method} {path}" for method, path in ENDPOINTS if (method, path) not in api]
    if missing:
        raise SystemExit(f"not in the Proxmox schema: {', '.join(missing)}")
    endpoints = [endpoint(method, path, api[(method, path)]) for method, path in ENDPOINTS]
    formats: dict[str, Any] = {}
    wanted: dict[str, tuple[str, str, str] | None] = dict.fromkeys(named_formats(endpoints))
    wanted.update(EXTRA_FORMATS)
    typetexts = {
        prop["format"]: prop["typetext"]
        for info in api.values()
        for prop in info.get("parameters", {}).get("properties", {}).values()
        if isinstance(prop.get("format"), str) and "=" in prop.get("typetext", "")
    }
    for name, source in sorted(wanted.items()):
        if source is None:
            formats[name] = format_from_typetext(typetexts[name])
            continue
        method, path, param = source
        prop = api[(method, path)]["parameters"]["properties"][param]
        if isinstance(prop["format"], dict):
            formats[name] = clean({"format": prop["format"]})["format"]
        else:
            formats[name] = format_from_typetext(prop["typetext"])
    return {
        "source": "Proxmox VE API schema (apidata.js)",
        "release": PVE_RELEASE,
        "source_sha256": hashlib.sha256(apidata.read_bytes()).hexdigest(),
        "endpoints": endpoints,
        "formats": formats,
    }


def render(document: dict[str, Any]) -> str:
    """Stable, diff-friendly JSON."""
    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apidata", type=Path, default=APIDATA)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="fail if the output is stale")
    args = parser.parse_args()
    text = render(build(args.apidata))
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run ops/gen-pve-schema", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}: {len(ENDPOINTS)} endpoints, {len(text) // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
