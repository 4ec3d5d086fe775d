"""An OpenAPI 3.1 document of every endpoint Rucher implements, built from the Proxmox schema.

Parameters, their constraints and the ``data`` each endpoint returns come from the same
extracted schema the gateway validates with, so the document cannot drift from the behaviour.
Proxmox's named formats are kept as ``x-pve-format``.
"""

from __future__ import annotations

import re
from typing import Any

from rucher.pve.schema import ApiSchema, Endpoint, Param

_PATH_PARAM = re.compile(r"\{(\w+)\}")
_JSON_TYPES = {"boolean", "integer", "number", "string", "array", "object", "null"}


def param_schema(param: Param) -> dict[str, Any]:
    """JSON Schema of one Proxmox parameter (booleans also accept Proxmox's 0/1 spellings)."""
    kind = param.type or "string"
    constraints = (
        ("enum", list(param.enum) if param.enum else None),
        ("minimum", param.minimum),
        ("maximum", param.maximum),
        ("minLength", param.min_length),
        ("maxLength", param.max_length),
        ("pattern", f"^{param.pattern}$" if param.pattern else None),
        ("default", param.default),
        ("description", param.description or None),
    )
    schema: dict[str, Any] = {"type": kind if kind in _JSON_TYPES else "string"}
    schema.update((key, value) for key, value in constraints if value is not None)
    if isinstance(param.format, str):
        schema["x-pve-format"] = param.format
    elif isinstance(param.format, dict):
        schema["x-pve-format"] = {key: param_schema(sub) for key, sub in param.format.items()}
    return schema


def returns_schema(returns: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a Proxmox return description (``optional`` becomes ``required``)."""
    schema: dict[str, Any] = {}
    kind = returns.get("type")
    if kind in _JSON_TYPES:
        schema["type"] = kind
    for key in ("description", "enum", "minimum", "maximum", "pattern"):
        if key in returns:
            schema[key] = returns[key]
    if isinstance(returns.get("items"), dict):
        schema["items"] = returns_schema(returns["items"])
    properties = returns.get("properties")
    if isinstance(properties, dict):
        schema["properties"] = {name: returns_schema(sub) for name, sub in properties.items()}
        required = [name for name, sub in properties.items() if not sub.get("optional")]
        if required:
            schema["required"] = sorted(required)
    return schema


def operation(endpoint: Endpoint) -> dict[str, Any]:
    """One operation: parameters, body, the ``data`` envelope, who may call it."""
    in_path = set(_PATH_PARAM.findall(endpoint.path))
    props = endpoint.parameters.properties
    parameters = [
        {
            "name": name,
            "in": "path" if name in in_path else "query",
            "required": name in in_path or not param.optional,
            "schema": param_schema(param),
        }
        for name, param in sorted(props.items())
        if name in in_path or endpoint.method in {"GET", "DELETE"}
    ]
    op: dict[str, Any] = {
        "operationId": f"{endpoint.method.lower()}{endpoint.path}",
        "summary": endpoint.description.split("\n")[0],
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "Success: the result in ``data``.",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"data": returns_schema(endpoint.returns)},
                        }
                    }
                },
            },
            "default": {"$ref": "#/components/responses/Error"},
        },
        "x-pve-permissions": {
            key: value
            for key, value in (
                ("user", endpoint.permissions.user),
                ("check", endpoint.permissions.check),
                ("description", endpoint.permissions.description or None),
            )
            if value is not None
        },
    }
    if endpoint.method in {"POST", "PUT"}:
        body_props = {n: p for n, p in props.items() if n not in in_path}
        body = {
            "type": "object",
            "properties": {name: param_schema(param) for name, param in body_props.items()},
            "additionalProperties": False,
        }
        required = sorted(n for n, p in body_props.items() if not p.optional)
        if required:
            body["required"] = required
        op["requestBody"] = {
            "content": {
                "application/x-www-form-urlencoded": {"schema": body},
                "application/json": {"schema": body},
            }
        }
    if endpoint.permissions.user == "world":
        op["security"] = []
    else:
        ticket: dict[str, list[str]] = (
            {"ticket": []} if endpoint.method == "GET" else {"ticket": [], "csrf": []}
        )
        op["security"] = [ticket, *([{"token": []}] if endpoint.allowtoken else [])]
    return op


def build(schema: ApiSchema, prefix: str, version: str) -> dict[str, Any]:
    """The whole document."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in schema.endpoints:
        paths.setdefault(prefix + endpoint.path, {})[endpoint.method.lower()] = operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Rucher: Proxmox VE compatible API",
            "version": version,
            "description": f"The Proxmox VE {schema.release} API endpoints Rucher implements.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "ticket": {"type": "apiKey", "in": "cookie", "name": "PVEAuthCookie"},
                "csrf": {"type": "apiKey", "in": "header", "name": "CSRFPreventionToken"},
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "PVEAPIToken=USER@REALM!TOKENID=SECRET",
                },
            },
            "responses": {
                "Error": {
                    "description": "An error: 400 names each bad parameter in ``errors``.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "data": {"type": "null"},
                                    "message": {"type": "string"},
                                    "errors": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                },
                            }
                        }
                    },
                }
            },
        },
    }
