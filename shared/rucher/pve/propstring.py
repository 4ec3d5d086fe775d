"""Proxmox property strings: ``virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1``.

A property string is a comma-separated list of ``key=value`` parts, described by a format: a
dict of sub-property schemas from the Proxmox API schema. One sub-property may be the
``default_key``, written without ``key=`` (``local:32`` for a disk's ``file``); an ``alias`` names
another key, and a ``keyAlias`` turns ``virtio=MAC`` into ``model=virtio`` plus ``macaddr=MAC``.
:func:`parse` and :func:`format_string` follow ``PVE::JSONSchema``'s ``parse_property_string``
and ``print_property_string``, so values round-trip the way Proxmox writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rucher.pve.schema import Param
from rucher.pve.values import InvalidValueError, coerce

Format = Mapping[str, Param]


class PropertyStringError(InvalidValueError):
    """A property string its format refuses; the message names the offending key."""


def _default_key(fmt: Format) -> str | None:
    return next((key for key, schema in fmt.items() if schema.default_key), None)


def _key_aliases(fmt: Format) -> dict[str, str]:
    """``{model: macaddr}`` for ``virtio=MAC``-style keys: the key alias and the value's key."""
    return {
        schema.key_alias: schema.alias
        for schema in fmt.values()
        if schema.key_alias is not None and schema.alias is not None
    }


def split(text: str, fmt: Format) -> dict[str, str]:
    """The raw ``key -> value`` pairs of ``text``, keys resolved through aliases."""
    raw: dict[str, str] = {}
    default_key = _default_key(fmt)
    for part in text.split(","):
        if part == "":
            continue
        key, sep, value = part.partition("=")
        if not sep:
            if default_key is None:
                raise PropertyStringError(
                    "value without key, but schema does not define a default key"
                )
            if default_key in raw:
                raise PropertyStringError(
                    f"duplicate key in comma-separated list property: {default_key}"
                )
            raw[default_key] = part
            continue
        if not key:
            raise PropertyStringError("missing key in comma-separated list property")
        if key in raw:
            raise PropertyStringError(f"duplicate key in comma-separated list property: {key}")
        schema = fmt.get(key)
        if schema is not None and schema.alias is not None:
            if schema.key_alias is not None:
                if schema.key_alias in raw:
                    raise PropertyStringError(f"key alias '{schema.key_alias}' is already defined")
                raw[schema.key_alias] = key
            key = schema.alias
            if key in raw:
                raise PropertyStringError(f"duplicate key in comma-separated list property: {key}")
        if key not in fmt:
            raise PropertyStringError(f"invalid key in comma-separated list property: {key}")
        raw[key] = value
    return raw


def parse(text: str, fmt: Format) -> dict[str, Any]:
    """Parse and check ``text``: each value in its sub-property's type; raises on any error."""
    raw = split(text, fmt)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, schema in fmt.items():
        if schema.alias is not None:
            continue
        if key not in raw:
            if not schema.optional:
                problems.append(f"{key}: property is missing and it is not optional")
            continue
        try:
            values[key] = coerce(schema, raw[key])
        except InvalidValueError as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise PropertyStringError("invalid format - " + "; ".join(problems))
    return values


def _text(schema: Param | None, value: Any) -> str:
    if schema is not None and schema.type == "boolean":
        return "1" if value else "0"
    return str(value)


def format_string(values: Mapping[str, Any], fmt: Format) -> str:
    """Write ``values`` as Proxmox does: default key first, then required keys, then the rest.

    Keys are sorted within each group; a key alias and its value are written as ``alias=value``.
    """
    parts: list[str] = []
    done: set[str] = set()
    key_aliases = _key_aliases(fmt)

    def add(key: str, *, bare: bool = False) -> None:
        if key in done or values.get(key) is None:
            return
        done.add(key)
        schema = fmt.get(key)
        combined = key_aliases.get(key)
        if combined is not None and values.get(combined) is not None:
            text = _text(schema, values[key])
            parts.append(f"{text}={_text(fmt.get(combined), values[combined])}")
            done.add(combined)
            return
        if schema is None or schema.alias is not None:
            raise PropertyStringError(f"invalid key '{key}'")
        text = _text(schema, values[key])
        parts.append(text if bare else f"{key}={text}")

    default_key = _default_key(fmt)
    if default_key is not None:
        add(default_key, bare=True)
    for key in sorted(values):
        schema = fmt.get(key)
        if schema is not None and not schema.optional:
            add(key)
    for key in sorted(values):
        add(key)
    return ",".join(parts)
