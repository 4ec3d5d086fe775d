"""Proxmox's permission clauses, evaluated as PVE::RPCEnvironment::check_api2_permissions does.

Each endpoint of the extracted schema carries ``user: world`` (anyone), ``user: all`` (anyone
authenticated; the handler filters what it lists) or a ``check`` clause: ``["perm", path, privs]``
(with ``"any", 1`` one of them suffices), ``["and", ...]``, ``["or", ...]``,
``["userid-param", "self" | priv]``, ``["userid-group", privs, "groups_param", "create"|"update"]``
and ``["perm-modify", path]``. Paths name parameters in braces (``/nodes/{node}``). Decisions
come from the IAM permission index (:class:`rucher.pve.acl.AclIndex`), in memory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.pve.acl import AclIndex
from rucher.pve.params import Params
from rucher.pve.schema import Permissions
from rucher.pve.values import split_list

_PLACEHOLDER = re.compile(r"\{(\w+)\}")

# What a path's kind adds to Permissions.Modify for changing its ACL (check_perm_modify).
_MODIFY_ALSO = (
    (re.compile(r"^/storage/.+$"), "Datastore.Allocate"),
    (re.compile(r"^/vms/.+$"), "VM.Allocate"),
    (re.compile(r"^/pool/.+$"), "Pool.Allocate"),
)


def forbidden(message: str = "Permission check failed") -> RucherError:
    """The error of a failed permission check (HTTP 403)."""
    return RucherError(ErrorCode.FORBIDDEN, message)


def fill_path(template: str, params: Params) -> str:
    """``/nodes/{node}`` with the request's values."""

    def value(match: re.Match[str]) -> str:
        found = params[match[1]]
        if found is None:
            raise forbidden(f"Permission check failed ({template}: no {match[1]} given)")
        return str(found)

    return _PLACEHOLDER.sub(value, template)


def can_modify_acl(index: AclIndex, authid: str, path: str) -> bool:
    """Whether ``authid`` may change ACL entries on ``path`` (PVE's check_perm_modify)."""
    privs = ["Permissions.Modify"]
    privs += [priv for pattern, priv in _MODIFY_ALSO if pattern.match(path)]
    return index.allowed(authid, path, privs, any_=True)


def may_manage_user(index: AclIndex, authid: str, userid: str, privs: Sequence[str]) -> bool:
    """Whether ``authid`` holds one of ``privs`` on all groups or on a group ``userid`` is in."""
    if index.allowed(authid, "/access/groups", privs, any_=True):
        return True
    groups = index.memberships.get(userid, frozenset())
    return any(
        index.allowed(authid, f"/access/groups/{group}", privs, any_=True) for group in groups
    )


class Checker:
    """Evaluates one endpoint's permission clause for one caller."""

    def __init__(self, index: AclIndex, authid: str, params: Params) -> None:
        self.index = index
        self.authid = authid
        self.params = params

    def check(self, clause: Sequence[Any]) -> bool:
        """Whether ``clause`` holds."""
        test, *args = clause
        if test == "and":
            return all(self.check(sub) for sub in args)
        if test == "or":
            return any(self.check(sub) for sub in args)
        if test == "perm":
            path, privs, *options = args
            any_ = dict(zip(options[::2], options[1::2], strict=True)).get("any", 0) == 1
            return self.index.allowed(self.authid, fill_path(path, self.params), privs, any_)
        if test == "perm-modify":
            return can_modify_acl(self.index, self.authid, fill_path(args[0], self.params))
        if test == "userid-param":
            return self._userid_param(args[0])
        if test == "userid-group":
            privs, *options = args
            return self._userid_group(privs, dict(zip(options[::2], options[1::2], strict=True)))
        raise RucherError(ErrorCode.INTERNAL, f"unknown permission check {test!r}")

    def _userid_param(self, what: str) -> bool:
        userid = str(self.params["userid"])
        if what == "self":
            return userid == self.authid
        realm = userid.rpartition("@")[2]
        return self.index.allowed(self.authid, f"/access/realm/{realm}", [what])

    def _userid_group(self, privs: list[str], options: dict[str, str]) -> bool:
        userid = str(self.params["userid"])
        mode = options.get("groups_param")
        existing = mode != "create"
        # Rights on every group suffice; whether the user exists is then the IAM service's
        # answer (404), which also holds for a user created a moment ago.
        if self.index.allowed(self.authid, "/access/groups", privs, any_=True):
            return True
        if existing and userid not in self.index.users:
            return False
        if mode:
            # Without rights on every group, each group named must be one the caller manages.
            wanted = split_list(str(self.params.get("groups", "")))
            if not wanted or not all(
                self.index.allowed(self.authid, f"/access/groups/{group}", privs, any_=True)
                for group in wanted
            ):
                return False
        return not existing or may_manage_user(self.index, self.authid, userid, privs)


def require(permissions: Permissions, index: AclIndex, authid: str | None, params: Params) -> None:
    """Raise ``unauthenticated`` or ``forbidden`` unless the caller passes ``permissions``."""
    if permissions.user == "world":
        return
    if authid is None:
        raise RucherError(ErrorCode.UNAUTHENTICATED, "authentication required")
    if permissions.check and not Checker(index, authid, params).check(permissions.check):
        raise forbidden()
