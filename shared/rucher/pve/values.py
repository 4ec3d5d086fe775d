"""Proxmox's scalar value checks: types, ranges, lengths, enums, patterns and named formats.

A value arrives as text (query string, form body) or as a JSON scalar; :func:`coerce` returns it
in its schema type or raises :class:`InvalidValueError` with Proxmox's wording. Named formats
(``pve-node``, ``pve-userid``...) are checked by :data:`FORMATS`; a ``-list`` suffix means a list
of such values separated by ``,``, ``;``, spaces or NULs, an ``-opt`` suffix also allows ``""``.
Identifier formats use the patterns of the bus contract (:mod:`rucher.proto`), so a value the
gateway accepts is one the services decode.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, get_args

import msgspec

from rucher.proto.common import NodeName, PoolId, StorageId, UserId
from rucher.proto.guest import FIRST_VMID, LAST_VMID
from rucher.proto.iam_state import GroupId, RoleId
from rucher.pve.schema import Param

Scalar = str | int | float | bool
FormatCheck = Callable[[str], None]

# Strings without a maxLength in the schema are still bounded: nothing Proxmox takes is longer.
MAX_STRING = 64 * 1024

_TRUE = frozenset({"1", "on", "yes", "true"})
_FALSE = frozenset({"0", "off", "no", "false"})
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_LIST_SEPARATORS = re.compile(r"[\0,;\s]+")


class InvalidValueError(ValueError):
    """A value its schema refuses; the message is what the client sees for that field."""


def _pattern(annotated: Any) -> re.Pattern[str]:
    """The compiled pattern of a constrained proto type such as ``NodeName``."""
    meta = next(arg for arg in get_args(annotated) if isinstance(arg, msgspec.Meta))
    assert meta.pattern is not None
    return re.compile(meta.pattern)


def _matching(regex: re.Pattern[str] | str, message: str) -> FormatCheck:
    compiled = re.compile(regex) if isinstance(regex, str) else regex

    def check(value: str) -> None:
        if not compiled.search(value):
            raise InvalidValueError(message.format(value=value))

    return check


def _ip(version: int, message: str) -> FormatCheck:
    def check(value: str) -> None:
        try:
            address = ipaddress.ip_address(value)
        except ValueError as err:
            raise InvalidValueError(message.format(value=value)) from err
        if address.version != version:
            raise InvalidValueError(message.format(value=value))

    return check


def _ip_config(version: int, keywords: frozenset[str]) -> FormatCheck:
    name = f"IPv{version}"

    def check(value: str) -> None:
        if value in keywords:
            return
        try:
            interface = ipaddress.ip_interface(value)
        except ValueError as err:
            raise InvalidValueError(
                f"value does not look like a valid {name} network config"
            ) from err
        if interface.version != version or "/" not in value:
            raise InvalidValueError(f"value does not look like a valid {name} network config")

    return check


_DNS_NAME = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?$"
)


def _address(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _DNS_NAME.match(value) or len(value) > 253:
            raise InvalidValueError(f"value does not look like a valid address: {value}") from None


_STORAGE = r"[a-zA-Z][a-zA-Z0-9._-]*[a-zA-Z0-9]"
_VOLUME_ID = re.compile(rf"^{_STORAGE}:\S.*$")


def _volume(*, qm_path: bool, absolute: bool) -> FormatCheck:
    def check(value: str) -> None:
        if qm_path and value in {"none", "cdrom"}:
            return
        if (qm_path or absolute) and value.startswith("/"):
            return
        if not _VOLUME_ID.match(value):
            raise InvalidValueError(f"unable to parse volume ID '{value}'")

    return check


def _portal_dns(value: str) -> None:
    """``host[:port]`` or ``[ipv6][:port]``, as PVE::Storage::Plugin's verify_portal_dns."""
    host, port = value, ""
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", value)
    if bracketed:
        host, port = bracketed[1], bracketed[2] or ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise InvalidValueError(f"invalid portal '{value}'")
    try:
        _address(host)
    except InvalidValueError:
        raise InvalidValueError(f"invalid portal '{value}'") from None


def _mount_point(value: str) -> None:
    if re.search(r"(?:^|/)\.\.?(?:/|$)", value):
        raise InvalidValueError(f"{value} contains illegal character sequences")


_USERID = _pattern(UserId)


def _userid(value: str) -> None:
    if not _USERID.match(value):
        raise InvalidValueError(f"value '{value}' does not look like a valid user name")


_TOKEN_NAME = r"[A-Za-z][A-Za-z0-9._-]{0,63}"  # noqa: S105 - a pattern, not a secret


def _tokenid(value: str) -> None:
    user, _, token = value.partition("!")
    if not token or not _USERID.match(user) or not re.fullmatch(_TOKEN_NAME, token):
        raise InvalidValueError(f"value '{value}' does not look like a valid token ID")


def _vmid(value: str) -> None:
    if not (value.isdigit() and FIRST_VMID <= int(value) <= LAST_VMID):
        raise InvalidValueError("value does not look like a valid VM ID")


FORMATS: dict[str, FormatCheck] = {
    "pve-vmid": _vmid,
    "pve-node": _matching(_pattern(NodeName), "value does not look like a valid node name"),
    "pve-userid": _userid,
    "pve-tokenid": _tokenid,
    "pve-groupid": _matching(_pattern(GroupId), "invalid group ID '{value}'"),
    "pve-roleid": _matching(_pattern(RoleId), "invalid role ID '{value}'"),
    "pve-poolid": _matching(_pattern(PoolId), "invalid pool ID '{value}'"),
    "pve-realm": _matching(
        r"^[A-Za-z][A-Za-z0-9._-]{1,31}$", "value '{value}' does not look like a valid realm"
    ),
    "pve-configid": _matching(r"^[a-zA-Z][a-zA-Z0-9_-]+$", "invalid configuration ID '{value}'"),
    "string": _matching(r"^[^\x00-\x1f]*$", "invalid string '{value}'"),
    "pve-ha-resource-or-vm-id": _matching(
        r"^(?:(?:vm|ct):)?\d+$", "value does not look like a valid ha resource id"
    ),
    "pve-ha-resource-id": _matching(
        r"^\w+:\S+$", "value does not look like a valid ha resource id"
    ),
    "pve-ha-node": _matching(
        r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?::\d+)?$",
        "value does not look like a valid ha node name '{value}'",
    ),
    "pve-storage-id": _matching(
        _pattern(StorageId), "storage ID '{value}' contains illegal characters"
    ),
    "pve-storage-content": _matching(
        r"^(images|rootdir|vztmpl|iso|backup|snippets|import)$",
        "invalid content type '{value}'",
    ),
    "pve-priv": _matching(
        r"^[A-Z][A-Za-z]*(?:\.[A-Z][A-Za-z]*)+$", "invalid privilege name '{value}'"
    ),
    "pve-task-status-type": _matching(
        r"(?i)^(ok|error|warning|unknown)$", "invalid task status type '{value}'"
    ),
    "pve-bridge-id": _matching(r"^[-_.\w]+$", "invalid bridge ID '{value}'"),
    # Guest config scalars (POST /nodes/{node}/qemu and its config endpoints).
    "dns-name": _matching(
        r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])\.)*"
        r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])$",
        "value does not look like a valid DNS name",
    ),
    "pve-cpuset": _matching(r"^\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*$", "invalid cpuset '{value}'"),
    "pve-hotplug-features": _matching(
        r"^(?:0|1|(?:network|disk|cpu|memory|usb|cloudinit)"
        r"(?:,(?:network|disk|cpu|memory|usb|cloudinit))*)$",
        "invalid hotplug feature list '{value}'",
    ),
    "CIDR": _matching(
        r"^(?:\d{1,3}(?:\.\d{1,3}){3}/\d{1,2}|[0-9a-fA-F:]+/\d{1,3})$",
        "value does not look like a valid CIDR network",
    ),
    "storage-pair": _matching(
        r"^(?:[a-zA-Z][a-zA-Z0-9._-]*[a-zA-Z0-9](?::[a-zA-Z][a-zA-Z0-9._-]*[a-zA-Z0-9])?|1)$",
        "invalid storage mapping '{value}'",
    ),
    "pve-tag": _matching(r"^[a-zA-Z0-9_][a-zA-Z0-9_+.-]*$", "invalid tag '{value}'"),
    "pve-qm-bootdisk": _matching(
        r"^(?:ide|sata|scsi|virtio|efidisk|tpmstate)\d+$", "invalid boot disk '{value}'"
    ),
    "mac-addr": _matching(
        r"(?i)^[a-f0-9][02468ace](?::[a-f0-9]{2}){5}$",
        "value does not look like a valid unicast MAC address",
    ),
    "ipv4": _ip(4, "value does not look like a valid IPv4 address"),
    "ipv6": _ip(6, "value does not look like a valid IPv6 address"),
    "pve-ipv4-config": _ip_config(4, frozenset({"dhcp", "manual"})),
    "pve-ipv6-config": _ip_config(6, frozenset({"dhcp", "auto", "manual"})),
    "address": _address,
    "email": _matching(
        r"^[\w+~-]+(?:\.[\w+~-]+)*@[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*$",
        "value does not look like a valid email address",
    ),
    "ldap-simple-attr": _matching(
        r"^[a-zA-Z][a-zA-Z0-9-]*$", "value '{value}' does not look like a simple ldap attribute"
    ),
    "disk-size": _matching(r"^\d+(?:\.\d+)?[KMGT]?$", "value '{value}' is not a valid disk size"),
    "urlencoded": _matching(r"^[-%a-zA-Z0-9_.!~*'()]*$", "invalid urlencoded string: {value}"),
    "pve-volume-id": _volume(qm_path=False, absolute=False),
    "pve-volume-id-or-qm-path": _volume(qm_path=True, absolute=True),
    "pve-volume-id-or-absolute-path": _volume(qm_path=False, absolute=True),
    "pve-lxc-mp-string": _mount_point,
    # Storage definitions (POST/PUT /storage), as PVE::Storage::Plugin checks them.
    "pve-storage-path": _matching(r"^/[^;()\0]*$", "invalid path '{value}'"),
    "pve-storage-server": _address,
    "pve-storage-portal-dns": _portal_dns,
    "pve-storage-vgname": _matching(
        r"^[a-zA-Z0-9.+_][a-zA-Z0-9.+_-]*$", "invalid volume group name '{value}'"
    ),
    "pve-storage-options": _matching(r"^[^\s\0]*$", "invalid options '{value}'"),
    "pve-dir-override": _matching(
        r"^(?:images|rootdir|vztmpl|iso|backup|snippets|import)=/?[^;()\s\0]+$",
        "invalid content directory override '{value}'",
    ),
}


def split_list(value: str) -> list[str]:
    """Proxmox's list syntax: items separated by commas, semicolons, whitespace or NULs."""
    return [item for item in _LIST_SEPARATORS.split(value) if item]


def known_format(name: str) -> bool:
    """Whether :func:`check_format` can check ``name`` (with its ``-list``/``-opt`` suffixes)."""
    base = name.removesuffix("-opt")
    base = re.sub(r"-a?list$", "", base)
    return base in FORMATS


def check_format(name: str, value: str) -> None:
    """Check ``value`` against the named format; raises :class:`InvalidValueError`."""
    if name.endswith("-opt"):
        if value == "":
            return
        name = name.removesuffix("-opt")
    base, suffix = re.subn(r"-a?list$", "", name)
    check = FORMATS[base]
    if suffix:
        for item in split_list(value):
            check(item)
    else:
        check(value)


def _boolean(raw: Scalar) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    text = str(raw).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidValueError(f"type check ('boolean') failed - got '{raw}'")


def _integer(raw: Scalar) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and _INTEGER.fullmatch(raw):
        return int(raw)
    raise InvalidValueError(f"type check ('integer') failed - got '{raw}'")


def _number(raw: Scalar) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str) and _NUMBER.fullmatch(raw):
        return float(raw)
    raise InvalidValueError(f"type check ('number') failed - got '{raw}'")


def _check_range(param: Param, value: float) -> None:
    if param.minimum is not None and value < param.minimum:
        raise InvalidValueError(f"value must have a minimum value of {_num(param.minimum)}")
    if param.maximum is not None and value > param.maximum:
        raise InvalidValueError(f"value must have a maximum value of {_num(param.maximum)}")


def _num(limit: float) -> str:
    return str(int(limit)) if limit == int(limit) else str(limit)


def _string(param: Param, raw: Scalar) -> str:
    if isinstance(raw, bool):
        raise InvalidValueError(f"type check ('string') failed - got '{raw}'")
    text = raw if isinstance(raw, str) else str(raw)
    limit = param.max_length if param.max_length is not None else MAX_STRING
    if len(text) > limit:
        raise InvalidValueError(f"value may only be {limit} characters long")
    if param.min_length is not None and len(text) < param.min_length:
        raise InvalidValueError(f"value must be at least {param.min_length} characters long")
    if param.enum is not None and text not in param.enum:
        allowed = ", ".join(param.enum)
        raise InvalidValueError(
            f"value '{text}' does not have a value in the enumeration '{allowed}'"
        )
    regex = param.regex
    if regex is not None and not regex.fullmatch(text):
        raise InvalidValueError(f"value does not match the regex pattern ({param.pattern})")
    return text


def coerce(param: Param, raw: Scalar) -> bool | int | float | str:
    """``raw`` in ``param``'s type, checked against its constraints and scalar format."""
    kind = param.type or "string"
    value: bool | int | float | str
    if kind == "boolean":
        return _boolean(raw)
    if kind == "integer":
        value = _integer(raw)
        _check_range(param, value)
    elif kind == "number":
        value = _number(raw)
        _check_range(param, value)
    elif kind == "string":
        value = _string(param, raw)
    else:
        raise InvalidValueError(f"type check ('{kind}') failed - got '{raw}'")
    # Other named formats are property strings: the caller parses those (rucher.pve.params).
    if isinstance(param.format, str) and known_format(param.format):
        check_format(param.format, str(value))
    return value
