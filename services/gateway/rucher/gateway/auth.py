"""Who is calling: an API token, or a ticket cookie with its CSRF token on changes.

``Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`` authenticates a token (no CSRF token:
a header cannot be forged cross-site). Otherwise the ``PVEAuthCookie`` cookie carries a ticket,
and every request but GET must also carry ``CSRFPreventionToken`` as Proxmox requires. Both are
checked from memory by the IAM view (:class:`rucher.authz.AuthzView`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from starlette.requests import Request

from rucher.authz import AuthzView
from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode

TICKET_COOKIE = "PVEAuthCookie"
CSRF_HEADER = "csrfpreventiontoken"
TOKEN_SCHEME = "PVEAPIToken"  # noqa: S105 - an authorization scheme, not a secret
_SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``authid`` is the user or the token acting, ``userid`` its user."""

    authid: str
    userid: str
    token: bool


def identify(view: AuthzView, request: Request) -> Caller | None:
    """The caller, ``None`` when the request carries no credentials; invalid ones raise 401."""
    header = request.headers.get("authorization")
    if header is not None and header.lstrip().startswith(TOKEN_SCHEME):
        tokenid = view.verify_api_token(header)
        return Caller(authid=tokenid, userid=tokenid.partition("!")[0], token=True)
    cookie = request.cookies.get(TICKET_COOKIE)
    if not cookie:
        return None
    userid = view.verify_ticket(unquote(cookie))
    if request.method not in _SAFE_METHODS:
        csrf = request.headers.get(CSRF_HEADER)
        if not csrf:
            raise RucherError(ErrorCode.UNAUTHENTICATED, "missing CSRF prevention token")
        view.verify_csrf(userid, csrf)
    return Caller(authid=userid, userid=userid, token=False)
