"""Request parameters checked against an endpoint's Proxmox schema, as the Proxmox API does.

Values come from the path, the query string, a form-encoded body or a JSON body
(:func:`parse_urlencoded`, :func:`parse_json`); :func:`validate` checks every one against the
endpoint's parameter schema and returns them in their types, or raises :class:`ParamError`
naming each bad field with Proxmox's wording (``property is missing and it is not optional``,
``type check ('integer') failed - got 'abc'``...). Invalid UTF-8, duplicated fields and values
longer than allowed are refused the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from rucher.pve import propstring
from rucher.pve.schema import Param, ParamsSpec
from rucher.pve.values import InvalidValueError, Scalar, coerce

MISSING = "property is missing and it is not optional"
UNKNOWN = "property is not defined in schema and the schema does not allow additional properties"
DUPLICATE = "duplicate parameter"
# A request value: one scalar, or every value of an array parameter given several times.
Value = Scalar | tuple[Scalar, ...]
BAD_UTF8 = "value is not valid UTF-8"

_INDEXED = re.compile(r"^([a-z][a-z_-]*?)(\d{1,3})$")


class ParamError(Exception):
    """Parameters an endpoint refuses: ``errors`` maps each bad field to the reason."""

    def __init__(
        self, errors: Mapping[str, str], message: str = "Parameter verification failed."
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errors = dict(errors)


@dataclass(frozen=True)
class Params:
    """Checked parameters: ``values`` as given (typed); reading a name falls back to its default."""

    values: dict[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name] if name in self.values else self.defaults.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def get(self, name: str, default: Any = None) -> Any:
        """The value given, else the schema's default, else ``default``."""
        value = self[name]
        return default if value is None else value


def _decode(raw: bytes, name: str, errors: dict[str, str]) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        errors[name] = BAD_UTF8
        return None


def parse_urlencoded(raw: bytes) -> list[tuple[str, str]]:
    """``a=1&b=x+y`` as decoded pairs; keys or values that are not UTF-8 are refused."""
    pairs: list[tuple[str, str]] = []
    errors: dict[str, str] = {}
    for part in raw.split(b"&"):
        if not part:
            continue
        raw_key, _, raw_value = part.partition(b"=")
        key = _decode(unquote_to_bytes(raw_key.replace(b"+", b" ")), "parameter name", errors)
        if key is None:
            continue
        value = _decode(unquote_to_bytes(raw_value.replace(b"+", b" ")), key, errors)
        if value is not None:
            pairs.append((key, value))
    if errors:
        raise ParamError(errors)
    return pairs


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ParamError({key: DUPLICATE})
        result[key] = value
    return result


def parse_json(raw: bytes) -> list[tuple[str, Scalar]]:
    """A JSON object body as pairs of scalars (nested values are refused per field)."""
    try:
        document = json.loads(
            raw.decode("utf-8", "surrogateescape"), object_pairs_hook=_no_duplicates
        )
    except ValueError as err:
        raise ParamError({}, f"malformed JSON body: {err}") from err
    if not isinstance(document, dict):
        raise ParamError({}, "a JSON body must be an object")
    pairs: list[tuple[str, Scalar]] = []
    errors: dict[str, str] = {}
    for key, value in document.items():
        if not _utf8(key):
            errors["parameter name"] = BAD_UTF8
        elif value is None:
            continue
        elif isinstance(value, str) and not _utf8(value):
            errors[key] = BAD_UTF8
        elif isinstance(value, str | int | float | bool):
            pairs.append((key, value))
        elif isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            pairs.extend((key, item) for item in value)  # an array parameter's values
        else:
            errors[key] = f"type check failed - got a JSON {type(value).__name__}"
    if errors:
        raise ParamError(errors)
    return pairs


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def merge(
    *sources: Iterable[tuple[str, Scalar]], repeatable: frozenset[str] = frozenset()
) -> dict[str, Value]:
    """One mapping from several sources; a field given twice, anywhere, is refused.

    Fields in ``repeatable`` (array parameters, ``map=...&map=...``) collect every value.
    """
    merged: dict[str, Value] = {}
    for source in sources:
        for key, value in source:
            if key in repeatable:
                found = merged.get(key, ())
                merged[key] = (*(found if isinstance(found, tuple) else (found,)), value)
                continue
            if key in merged:
                raise ParamError({key: DUPLICATE})
            merged[key] = value
    return merged


def schema_of(spec: ParamsSpec, name: str) -> Param | None:
    """The schema of ``name``: exact, or an indexed family such as ``net[n]`` for ``net0``."""
    schema = spec.properties.get(name)
    if schema is None:
        match = _INDEXED.match(name)
        if match:
            schema = spec.properties.get(f"{match[1]}[n]")
    return schema


def check_value(
    schema: Param, raw: Scalar, formats: Mapping[str, propstring.Format]
) -> bool | int | float | str:
    """One value in its type; a property string is checked against its format and kept as text."""
    fmt = schema.format
    definition = fmt if isinstance(fmt, dict) else formats.get(fmt) if fmt else None
    value = coerce(schema, raw)
    if definition is not None:
        propstring.parse(str(value), definition)
    return value


def defaults(spec: ParamsSpec) -> dict[str, Any]:
    """Each parameter's schema default in its type (defaults that are prose are left out)."""
    result: dict[str, Any] = {}
    for name, schema in spec.properties.items():
        if schema.default is None:
            continue
        try:
            result[name] = coerce(schema, schema.default)
        except InvalidValueError:
            continue
    return result


def validate(
    spec: ParamsSpec,
    raw: Mapping[str, Value],
    *,
    formats: Mapping[str, propstring.Format],
    defaults_: Mapping[str, Any] | None = None,
) -> Params:
    """Check every value in ``raw`` against ``spec``; raises :class:`ParamError` naming each."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        schema = schema_of(spec, name)
        if schema is None:
            if not spec.additional_properties:
                errors[name] = UNKNOWN
            continue
        try:
            if schema.type == "array":
                item = schema.items or Param()
                given = value if isinstance(value, tuple) else (value,)
                values[name] = [check_value(item, one, formats) for one in given]
            elif isinstance(value, tuple):
                errors[name] = DUPLICATE
            else:
                values[name] = check_value(schema, value, formats)
        except InvalidValueError as err:
            errors[name] = str(err)
    for name, schema in spec.properties.items():
        if name.endswith("[n]"):
            continue
        if name not in raw and not schema.optional:
            errors.setdefault(name, MISSING)
        if name in raw and schema.requires and schema.requires not in raw:
            errors.setdefault(
                schema.requires, f"missing property - '{name}' requires this property"
            )
    if errors:
        raise ParamError(errors)
    return Params(values, defaults(spec) if defaults_ is None else defaults_)
