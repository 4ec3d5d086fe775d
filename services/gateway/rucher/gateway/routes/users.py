"""``/access`` users, API tokens, groups, roles and ACL entries, proxied to the IAM service.

Lists are filtered to what the caller may see, with Proxmox's rules: users and groups where the
caller holds ``User.Modify`` or ``Sys.Audit`` (on ``/access/groups`` or on the group), always
the caller's own user; ACL entries on paths whose permissions the caller may modify.
"""

from __future__ import annotations

from typing import Any

from rucher.bus import RucherError
from rucher.gateway.permissions import can_modify_acl, may_manage_user
from rucher.gateway.routes.access import USER_AUDIT, flag
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import iam
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import GroupInfo, RoleInfo, TokenInfo, UserInfo
from rucher.pve.values import split_list

ROUTES = RouteTable()

GROUP_AUDIT = ("User.Modify", "Sys.Audit", "Group.Allocate")


def _groups(call: Call) -> tuple[str, ...] | None:
    given = call.params["groups"]
    return None if given is None else tuple(split_list(given))


# Users --------------------------------------------------------------------------------------


def _token(info: TokenInfo) -> dict[str, Any]:
    return {"expire": info.expire, "privsep": flag(info.privsep), "comment": info.comment}


def _user(info: UserInfo) -> dict[str, Any]:
    data: dict[str, Any] = {
        "userid": info.userid,
        "enable": flag(info.enable),
        "expire": info.expire,
        "firstname": info.firstname,
        "lastname": info.lastname,
        "email": info.email,
        "comment": info.comment,
        "groups": ",".join(info.groups),
        "keys": info.keys,
    }
    if info.realm_type is not None:
        data["realm-type"] = info.realm_type.value
    if info.tfa:
        data["tfa-types"] = ",".join(info.tfa)
    return data


async def _users(call: Call, *, full: bool = True) -> tuple[UserInfo, ...]:
    query = call.command(iam.UserListQuery, full=full)
    return (await call.ask(iam.USER_LIST.address, query)).users


async def _user_info(call: Call, userid: str) -> UserInfo:
    for info in await _users(call):
        if info.userid == userid:
            return info
    raise RucherError(ErrorCode.NOT_FOUND, f"no such user ('{userid}')")


@ROUTES("GET", "/access/users")
async def list_users(call: Call) -> list[dict[str, Any]]:
    """Users the caller may manage or audit, and always the caller's own."""
    index = call.gateway.view.index
    enabled = call.params["enabled"]
    listed = []
    for info in await _users(call, full=bool(call.params["full"])):
        if enabled is not None and info.enable != enabled:
            continue
        if info.userid != call.user and not may_manage_user(
            index, call.authid, info.userid, USER_AUDIT
        ):
            continue
        entry = _user(info)
        if call.params["full"]:
            entry["tokens"] = [
                {"tokenid": token.tokenid.partition("!")[2], **_token(token)}
                for token in info.tokens
            ]
        listed.append(entry)
    return listed


@ROUTES("POST", "/access/users")
async def create_user(call: Call) -> None:
    """Create a user; a password only for the ``pve`` realm."""
    p = call.params
    request = call.command(
        iam.UserCreate,
        actor=call.authid,
        userid=p["userid"],
        password=p["password"],
        enable=p["enable"],
        expire=p["expire"],
        firstname=p["firstname"],
        lastname=p["lastname"],
        email=p["email"],
        comment=p["comment"],
        groups=_groups(call),
        keys=p["keys"],
    )
    await call.change_iam(
        iam.USER_CREATE.address, request, timeout=call.gateway.settings.login_timeout
    )


@ROUTES("GET", "/access/users/{userid}")
async def get_user(call: Call) -> dict[str, Any]:
    """One user, with their groups as a list and their tokens by name."""
    info = await _user_info(call, call.params["userid"])
    data = _user(info)
    data.pop("userid")
    data["groups"] = list(info.groups)
    data["tokens"] = {token.tokenid.partition("!")[2]: _token(token) for token in info.tokens}
    return data


@ROUTES("PUT", "/access/users/{userid}")
async def update_user(call: Call) -> None:
    """Change what is given; ``append`` adds ``groups`` instead of replacing them."""
    p = call.params
    request = call.command(
        iam.UserUpdate,
        actor=call.authid,
        userid=p["userid"],
        enable=p["enable"],
        expire=p["expire"],
        firstname=p["firstname"],
        lastname=p["lastname"],
        email=p["email"],
        comment=p["comment"],
        groups=_groups(call),
        append=p["append"],
        keys=p["keys"],
    )
    await call.change_iam(iam.USER_UPDATE.address, request)


@ROUTES("DELETE", "/access/users/{userid}")
async def delete_user(call: Call) -> None:
    """Delete a user, its tokens and its ACL entries."""
    request = call.command(iam.UserDelete, actor=call.authid, userid=call.params["userid"])
    await call.change_iam(iam.USER_DELETE.address, request)


# API tokens ---------------------------------------------------------------------------------


async def _tokens(call: Call) -> tuple[TokenInfo, ...]:
    query = call.command(iam.TokenListQuery, userid=call.params["userid"])
    return (await call.ask(iam.TOKEN_LIST.address, query)).tokens


async def _token_info(call: Call) -> TokenInfo:
    full = f"{call.params['userid']}!{call.params['tokenid']}"
    for info in await _tokens(call):
        if info.tokenid == full:
            return info
    raise RucherError(ErrorCode.NOT_FOUND, f"no such token '{call.params['tokenid']}'")


@ROUTES("GET", "/access/users/{userid}/token")
async def list_tokens(call: Call) -> list[dict[str, Any]]:
    """A user's API tokens, never their secrets."""
    return [
        {"tokenid": info.tokenid.partition("!")[2], **_token(info)} for info in await _tokens(call)
    ]


@ROUTES("GET", "/access/users/{userid}/token/{tokenid}")
async def get_token(call: Call) -> dict[str, Any]:
    """One API token's settings."""
    return _token(await _token_info(call))


@ROUTES("POST", "/access/users/{userid}/token/{tokenid}")
async def create_token(call: Call) -> dict[str, Any]:
    """A new API token; its secret ``value`` is shown this once."""
    p = call.params
    request = call.command(
        iam.TokenCreate,
        actor=call.authid,
        userid=p["userid"],
        tokenid=p["tokenid"],
        privsep=p["privsep"],
        expire=p["expire"],
        comment=p["comment"],
    )
    reply = await call.change_iam(iam.TOKEN_CREATE.address, request)
    return {"full-tokenid": reply.full_tokenid, "info": _token(reply.info), "value": reply.value}


@ROUTES("PUT", "/access/users/{userid}/token/{tokenid}")
async def update_token(call: Call) -> dict[str, Any]:
    """Change a token's settings; answers the settings now in force."""
    p = call.params
    request = call.command(
        iam.TokenUpdate,
        actor=call.authid,
        userid=p["userid"],
        tokenid=p["tokenid"],
        privsep=p["privsep"],
        expire=p["expire"],
        comment=p["comment"],
    )
    await call.change_iam(iam.TOKEN_UPDATE.address, request)
    return _token(await _token_info(call))


@ROUTES("DELETE", "/access/users/{userid}/token/{tokenid}")
async def delete_token(call: Call) -> None:
    """Delete an API token and its ACL entries."""
    p = call.params
    request = call.command(
        iam.TokenDelete, actor=call.authid, userid=p["userid"], tokenid=p["tokenid"]
    )
    await call.change_iam(iam.TOKEN_DELETE.address, request)


# Groups -------------------------------------------------------------------------------------


async def _group_list(call: Call) -> tuple[GroupInfo, ...]:
    return (await call.ask(iam.GROUP_LIST.address, call.command(iam.GroupListQuery))).groups


@ROUTES("GET", "/access/groups")
async def list_groups(call: Call) -> list[dict[str, Any]]:
    """Groups on which the caller holds User.Modify, Sys.Audit or Group.Allocate."""
    return [
        {"groupid": info.groupid, "comment": info.comment, "users": ",".join(info.members)}
        for info in await _group_list(call)
        if call.allowed(f"/access/groups/{info.groupid}", GROUP_AUDIT, any_=True)
    ]


@ROUTES("POST", "/access/groups")
async def create_group(call: Call) -> None:
    """Create a group."""
    p = call.params
    request = call.command(
        iam.GroupCreate, actor=call.authid, groupid=p["groupid"], comment=p["comment"]
    )
    await call.change_iam(iam.GROUP_CREATE.address, request)


@ROUTES("GET", "/access/groups/{groupid}")
async def get_group(call: Call) -> dict[str, Any]:
    """A group's comment and members."""
    for info in await _group_list(call):
        if info.groupid == call.params["groupid"]:
            return {"comment": info.comment, "members": list(info.members)}
    raise RucherError(ErrorCode.NOT_FOUND, f"group '{call.params['groupid']}' does not exist")


@ROUTES("PUT", "/access/groups/{groupid}")
async def update_group(call: Call) -> None:
    """Change a group's comment."""
    p = call.params
    request = call.command(
        iam.GroupUpdate, actor=call.authid, groupid=p["groupid"], comment=p["comment"]
    )
    await call.change_iam(iam.GROUP_UPDATE.address, request)


@ROUTES("DELETE", "/access/groups/{groupid}")
async def delete_group(call: Call) -> None:
    """Delete a group."""
    request = call.command(iam.GroupDelete, actor=call.authid, groupid=call.params["groupid"])
    await call.change_iam(iam.GROUP_DELETE.address, request)


# Roles --------------------------------------------------------------------------------------


async def _roles(call: Call) -> tuple[RoleInfo, ...]:
    return (await call.ask(iam.ROLE_LIST.address, call.command(iam.RoleListQuery))).roles


@ROUTES("GET", "/access/roles")
async def list_roles(call: Call) -> list[dict[str, Any]]:
    """Every role, built-in (``special``) or custom, with its privileges."""
    return [
        {
            "roleid": role.roleid,
            "privs": ",".join(sorted(role.privs)),
            "special": flag(role.special),
        }
        for role in await _roles(call)
    ]


@ROUTES("GET", "/access/roles/{roleid}")
async def get_role(call: Call) -> dict[str, int]:
    """A role's privileges, as Proxmox returns them: ``{privilege: 1}``."""
    for role in await _roles(call):
        if role.roleid == call.params["roleid"]:
            return dict.fromkeys(sorted(role.privs), 1)
    raise RucherError(ErrorCode.NOT_FOUND, f"role '{call.params['roleid']}' does not exist")


@ROUTES("POST", "/access/roles")
async def create_role(call: Call) -> None:
    """Create a custom role."""
    p = call.params
    request = call.command(
        iam.RoleCreate,
        actor=call.authid,
        roleid=p["roleid"],
        privs=tuple(split_list(p["privs"] or "")),
    )
    await call.change_iam(iam.ROLE_CREATE.address, request)


@ROUTES("PUT", "/access/roles/{roleid}")
async def update_role(call: Call) -> None:
    """Set a custom role's privileges (with ``append``: add to them)."""
    p = call.params
    request = call.command(
        iam.RoleUpdate,
        actor=call.authid,
        roleid=p["roleid"],
        privs=tuple(split_list(p["privs"] or "")),
        append=p["append"],
    )
    await call.change_iam(iam.ROLE_UPDATE.address, request)


@ROUTES("DELETE", "/access/roles/{roleid}")
async def delete_role(call: Call) -> None:
    """Delete a custom role."""
    request = call.command(iam.RoleDelete, actor=call.authid, roleid=call.params["roleid"])
    await call.change_iam(iam.ROLE_DELETE.address, request)


# ACL ----------------------------------------------------------------------------------------


@ROUTES("GET", "/access/acl")
async def list_acl(call: Call) -> list[dict[str, Any]]:
    """ACL entries on paths whose permissions the caller may modify (all with Sys.Audit)."""
    index = call.gateway.view.index
    auditor = call.allowed("/access", ["Sys.Audit"])
    reply = await call.ask(iam.ACL_LIST.address, call.command(iam.AclListQuery))
    return [
        {
            "path": entry.path,
            "type": entry.type.value,
            "ugid": entry.ugid,
            "roleid": entry.roleid,
            "propagate": flag(entry.propagate),
        }
        for entry in reply.entries
        if auditor or can_modify_acl(index, call.authid, entry.path)
    ]


@ROUTES("PUT", "/access/acl")
async def update_acl(call: Call) -> None:
    """Grant (or with ``delete``, revoke) roles on a path to users, groups and tokens."""
    p = call.params
    request = call.command(
        iam.AclUpdate,
        actor=call.authid,
        path=p["path"],
        roles=tuple(split_list(p["roles"])),
        users=tuple(split_list(p["users"] or "")),
        groups=tuple(split_list(p["groups"] or "")),
        tokens=tuple(split_list(p["tokens"] or "")),
        propagate=p["propagate"],
        delete=p["delete"],
    )
    await call.change_iam(iam.ACL_UPDATE.address, request)
