"""``/access``: login and tickets, password, permissions, realms, second factors, OpenID.

Each write is one request to the IAM service (``rpc.iam.*``) on behalf of the caller; lists
come from IAM too and are cut down here to what the caller may see, as Proxmox does.
"""

from __future__ import annotations

from typing import Any

from rucher.bus import RucherError
from rucher.gateway.permissions import forbidden, may_manage_user
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import iam
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import RealmInfo, RealmRecord, TfaEntryInfo
from rucher.pve.values import split_list

ROUTES = RouteTable()

USER_AUDIT = ("User.Modify", "Sys.Audit")

# Realm options: Proxmox's parameter name -> the field of RealmRecord.
REALM_OPTIONS = {
    "type": "type",
    "comment": "comment",
    "default": "default",
    "issuer-url": "issuer_url",
    "client-id": "client_id",
    "client-key": "client_key",
    "autocreate": "autocreate",
    "username-claim": "username_claim",
    "scopes": "scopes",
    "groups-claim": "groups_claim",
    "groups-autocreate": "groups_autocreate",
    "groups-overwrite": "groups_overwrite",
    "prompt": "prompt",
    "acr-values": "acr_values",
    "query-userinfo": "query_userinfo",
}


def flag(value: bool) -> int:
    """Proxmox writes booleans as 0/1."""
    return 1 if value else 0


@ROUTES("GET", "/access")
async def access_index(call: Call) -> list[dict[str, str]]:
    """The areas under /access."""
    return [
        {"subdir": name}
        for name in (
            "users",
            "groups",
            "roles",
            "acl",
            "domains",
            "ticket",
            "password",
            "permissions",
            "tfa",
            "openid",
        )
    ]


# Tickets ------------------------------------------------------------------------------------


def _granted(call: Call, reply: iam.LoginGranted) -> dict[str, Any]:
    data: dict[str, Any] = {
        "username": reply.username,
        "ticket": reply.ticket,
        # Clients (proxmoxer) read the CSRF token before looking for NeedTFA: always send it.
        "CSRFPreventionToken": reply.csrf_token,
        "cap": reply.cap,
        "clustername": reply.clustername or call.gateway.settings.cluster_name,
    }
    if reply.need_tfa:
        data["NeedTFA"] = 1
    return data


def _source(call: Call) -> str:
    client = call.request.client
    return client.host if client else ""


@ROUTES("GET", "/access/ticket")
async def ticket_form(call: Call) -> None:
    """Nothing: Proxmox answers this for login forms."""


@ROUTES("POST", "/access/ticket")
async def login(call: Call) -> dict[str, Any]:
    """A password (or the current ticket, to renew it) for a ticket and a CSRF token."""
    p = call.params
    request = call.command(
        iam.Login,
        username=p["username"],
        password=p["password"],
        realm=p["realm"],
        otp=p["otp"],
        tfa_challenge=p["tfa-challenge"],
        source=_source(call),
    )
    reply = await call.ask(iam.LOGIN.address, request, timeout=call.gateway.settings.login_timeout)
    # A login may also ask whether the user holds privileges on a path (noVNC does).
    privs = split_list(p["privs"] or "")
    if p["path"] and privs and not call.gateway.view.allowed(reply.username, p["path"], privs):
        raise RucherError(ErrorCode.UNAUTHENTICATED, "permission check failed")
    return _granted(call, reply)


@ROUTES("POST", "/access/openid/auth-url")
async def openid_auth_url(call: Call) -> str:
    """Where to send the browser to log in at the realm's OpenID provider."""
    request = call.command(
        iam.OpenIdAuthUrl, realm=call.params["realm"], redirect_url=call.params["redirect-url"]
    )
    return (await call.ask(iam.OPENID_AUTH_URL.address, request)).url


@ROUTES("POST", "/access/openid/login")
async def openid_login(call: Call) -> dict[str, Any]:
    """Finish an OpenID login with the provider's code and state: a ticket, as a login."""
    p = call.params
    request = call.command(
        iam.OpenIdLogin,
        code=p["code"],
        state=p["state"],
        redirect_url=p["redirect-url"],
        source=_source(call),
    )
    reply = await call.ask(
        iam.OPENID_LOGIN.address, request, timeout=call.gateway.settings.login_timeout
    )
    return _granted(call, reply)


@ROUTES("PUT", "/access/password")
async def change_password(call: Call) -> None:
    """Set a user's password (their own, or as their administrator)."""
    p = call.params
    request = call.command(
        iam.PasswordChange,
        actor=call.authid,
        userid=p["userid"],
        password=p["password"],
        confirmation_password=p["confirmation-password"],
    )
    await call.change_iam(
        iam.PASSWORD_CHANGE.address, request, timeout=call.gateway.settings.login_timeout
    )


# Permissions --------------------------------------------------------------------------------


@ROUTES("GET", "/access/permissions")
async def permissions(call: Call) -> dict[str, dict[str, int]]:
    """Path -> privilege -> propagates: the caller's, its tokens', anyone's with Sys.Audit."""
    target = call.params["userid"] or call.authid
    own = target == call.authid or target.startswith(f"{call.authid}!")
    if not own and not call.allowed("/access", ["Sys.Audit"]):
        raise forbidden("Permission check failed (/access, Sys.Audit)")
    report = call.gateway.view.permissions(target, call.params["path"])
    return {
        path: {priv: flag(propagate) for priv, propagate in sorted(privs.items())}
        for path, privs in report.items()
    }


# Realms -------------------------------------------------------------------------------------


def _realm(info: RealmInfo) -> dict[str, Any]:
    data: dict[str, Any] = {"realm": info.realm, "type": info.type.value}
    for option, attribute in REALM_OPTIONS.items():
        value = getattr(info, attribute, None)
        if option != "type" and value not in (None, ""):
            data[option] = flag(value) if isinstance(value, bool) else value
    return data


async def _realms(call: Call) -> tuple[RealmInfo, ...]:
    reply = await call.ask(iam.DOMAIN_LIST.address, call.command(iam.DomainListQuery))
    return reply.domains


@ROUTES("GET", "/access/domains")
async def list_realms(call: Call) -> list[dict[str, Any]]:
    """Every realm: the login form needs them before anyone is authenticated."""
    return [
        {
            "realm": info.realm,
            "type": info.type.value,
            "comment": info.comment,
            **({"default": 1} if info.default else {}),
        }
        for info in await _realms(call)
    ]


@ROUTES("GET", "/access/domains/{realm}")
async def get_realm(call: Call) -> dict[str, Any]:
    """One realm's options (never its client secret)."""
    realm = call.params["realm"]
    for info in await _realms(call):
        if info.realm == realm:
            return _realm(info)
    raise RucherError(ErrorCode.NOT_FOUND, f"domain '{realm}' does not exist")


def _realm_options(call: Call) -> dict[str, Any]:
    given = set(call.params.values) - {"realm", "delete", "digest"}
    unsupported = sorted(given - REALM_OPTIONS.keys())
    if unsupported:
        raise RucherError(
            ErrorCode.UNSUPPORTED,
            f"Rucher's realms (pam, pve, openid) do not take: {', '.join(unsupported)}",
        )
    return {REALM_OPTIONS[name]: call.params.values[name] for name in given}


@ROUTES("POST", "/access/domains")
async def create_realm(call: Call) -> None:
    """Add an authentication realm (OpenID Connect; pam and pve always exist)."""
    config = call.command(RealmRecord, realm=call.params["realm"], **_realm_options(call))
    await call.change_iam(
        iam.DOMAIN_CREATE.address, call.command(iam.DomainCreate, actor=call.authid, config=config)
    )


@ROUTES("PUT", "/access/domains/{realm}")
async def update_realm(call: Call) -> None:
    """Change a realm's options; ``delete`` resets the options it names."""
    changes = _realm_options(call)
    changes.pop("type", None)
    deleted = [REALM_OPTIONS.get(name, name) for name in split_list(call.params["delete"] or "")]
    request = call.command(
        iam.DomainUpdate,
        actor=call.authid,
        realm=call.params["realm"],
        changes=changes,
        delete=tuple(deleted),
    )
    await call.change_iam(iam.DOMAIN_UPDATE.address, request)


@ROUTES("DELETE", "/access/domains/{realm}")
async def delete_realm(call: Call) -> None:
    """Remove a realm."""
    request = call.command(iam.DomainDelete, actor=call.authid, realm=call.params["realm"])
    await call.change_iam(iam.DOMAIN_DELETE.address, request)


# Second factors -----------------------------------------------------------------------------


def _tfa_entry(entry: TfaEntryInfo) -> dict[str, Any]:
    return {
        "id": entry.id,
        "type": entry.type,
        "description": entry.description,
        "created": int(entry.created),
        "enable": flag(entry.enable),
    }


async def _tfa_entries(call: Call, userid: str | None) -> tuple[TfaEntryInfo, ...]:
    reply = await call.ask(iam.TFA_LIST.address, call.command(iam.TfaListQuery, userid=userid))
    return reply.entries


@ROUTES("GET", "/access/tfa")
async def list_tfa(call: Call) -> list[dict[str, Any]]:
    """Second factors of every user the caller may manage (or audit), and their own."""
    index = call.gateway.view.index
    by_user: dict[str, list[dict[str, Any]]] = {}
    for entry in await _tfa_entries(call, None):
        if entry.userid == call.user or may_manage_user(
            index, call.authid, entry.userid, USER_AUDIT
        ):
            by_user.setdefault(entry.userid, []).append(_tfa_entry(entry))
    return [{"userid": user, "entries": entries} for user, entries in sorted(by_user.items())]


@ROUTES("GET", "/access/tfa/{userid}")
async def user_tfa(call: Call) -> list[dict[str, Any]]:
    """One user's second factors."""
    return [_tfa_entry(entry) for entry in await _tfa_entries(call, call.params["userid"])]


@ROUTES("GET", "/access/tfa/{userid}/{id}")
async def get_tfa(call: Call) -> dict[str, Any]:
    """One second factor."""
    for entry in await _tfa_entries(call, call.params["userid"]):
        if entry.id == call.params["id"]:
            return _tfa_entry(entry)
    raise RucherError(ErrorCode.NOT_FOUND, "no such tfa entry")


@ROUTES("POST", "/access/tfa/{userid}")
async def add_tfa(call: Call) -> dict[str, str]:
    """Add a TOTP factor: its ``otpauth://`` URI and a current code proving it works."""
    p = call.params
    if p["type"] != "totp":
        raise RucherError(ErrorCode.UNSUPPORTED, f"second factor type '{p['type']}'")
    request = call.command(
        iam.TfaAdd,
        actor=call.authid,
        userid=p["userid"],
        totp=p["totp"],
        value=p["value"],
        description=p["description"],
        password=p["password"],
    )
    # The actor's password may be checked by PAM, which is slow: as long as a login may take.
    timeout = call.gateway.settings.login_timeout
    return {"id": (await call.change_iam(iam.TFA_ADD.address, request, timeout=timeout)).id}


@ROUTES("DELETE", "/access/tfa/{userid}/{id}")
async def delete_tfa(call: Call) -> None:
    """Remove a second factor."""
    p = call.params
    request = call.command(
        iam.TfaDelete, actor=call.authid, userid=p["userid"], id=p["id"], password=p["password"]
    )
    await call.change_iam(
        iam.TFA_DELETE.address, request, timeout=call.gateway.settings.login_timeout
    )


@ROUTES("PUT", "/access/tfa/{userid}/{id}")
async def update_tfa(call: Call) -> None:
    """Change a second factor's description, or enable or disable it for login."""
    p = call.params
    request = call.command(
        iam.TfaUpdate,
        actor=call.authid,
        userid=p["userid"],
        id=p["id"],
        description=p["description"],
        enable=p["enable"],
        password=p["password"],
    )
    await call.change_iam(
        iam.TFA_UPDATE.address, request, timeout=call.gateway.settings.login_timeout
    )
