"""The Proxmox API schema of the endpoints Rucher implements, as typed, read-only records.

The document is extracted at build time from Proxmox's ``apidata.js`` by ``ops/gen-pve-schema``
and shipped inside the gateway's package; :func:`load_schema` reads it. Parameter schemas keep
Proxmox's JSON spelling (``maxLength``, ``default_key``...) on the wire and snake_case here.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any

import msgspec


class Param(msgspec.Struct, frozen=True, kw_only=True, rename="camel", dict=True):
    """One parameter, property-string sub-property or return value, as Proxmox describes it.

    ``format`` is a format name (``pve-vmid``), an inline property-string definition (a dict of
    sub-properties) or absent. ``alias``/``key_alias`` only appear in property-string formats.
    """

    type: str | None = None
    format: str | dict[str, Param] | None = None
    enum: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    default: Any = None
    optional: bool = False
    description: str = ""
    typetext: str | None = None
    format_description: str | None = msgspec.field(default=None, name="format_description")
    requires: str | None = None
    default_key: bool = msgspec.field(default=False, name="default_key")
    alias: str | None = None
    key_alias: str | None = None
    items: Param | None = None
    properties: dict[str, Param] | None = None
    additional_properties: Any = None

    @cached_property
    def regex(self) -> re.Pattern[str] | None:
        """The compiled pattern, anchored at both ends as Proxmox anchors it."""
        return None if self.pattern is None else re.compile(self.pattern)


class ParamsSpec(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An endpoint's parameters: path, query and body values alike."""

    additional_properties: bool = False
    properties: dict[str, Param] = {}


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    """Who may call an endpoint: ``user`` (``world`` or ``all``) or a ``check`` clause."""

    user: str | None = None
    check: tuple[Any, ...] | None = None
    description: str = ""


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One method on one path of the Proxmox API."""

    method: str
    path: str
    name: str = ""
    description: str = ""
    permissions: Permissions = Permissions()
    allowtoken: bool = False
    protected: bool = False
    parameters: ParamsSpec = ParamsSpec()
    returns: dict[str, Any] = {}

    @property
    def key(self) -> tuple[str, str]:
        """``(method, path)``, how endpoints are looked up."""
        return (self.method, self.path)


class ApiSchema(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """The extracted document: endpoints and the property-string formats they name."""

    release: str
    source: str = ""
    source_sha256: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    formats: dict[str, dict[str, Param]] = {}

    @cached_property
    def by_key(self) -> dict[tuple[str, str], Endpoint]:
        """Endpoints by ``(method, path)``."""
        return {endpoint.key: endpoint for endpoint in self.endpoints}

    def endpoint(self, method: str, path: str) -> Endpoint:
        """The endpoint for ``method`` on ``path``; KeyError if Rucher does not implement it."""
        return self.by_key[(method, path)]


def load_schema(data: bytes) -> ApiSchema:
    """Decode the JSON document written by ``ops/gen-pve-schema``."""
    # Proxmox writes its flags as 0/1: lax decoding reads them as booleans.
    return msgspec.json.decode(data, type=ApiSchema, strict=False)
