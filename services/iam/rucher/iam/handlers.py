"""One declaration per IAM subject: decode (done by the bus), call the service, reply."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from rucher.bus import Bus
from rucher.iam.service import IamService
from rucher.proto import iam
from rucher.proto.base import RpcSubject


def routes(service: IamService) -> list[tuple[RpcSubject[Any, Any], Callable[[Any], Any]]]:
    """Every ``rpc.iam.*`` subject with the operation answering it."""
    accounts, factors = service.accounts, service.factors
    access, auth = service.access, service.auth
    return [
        (iam.LOGIN, auth.login),
        (iam.OPENID_AUTH_URL, auth.openid_auth_url),
        (iam.OPENID_LOGIN, auth.openid_login),
        (iam.USER_CREATE, accounts.create_user),
        (iam.USER_UPDATE, accounts.update_user),
        (iam.USER_DELETE, accounts.delete_user),
        (iam.USER_LIST, accounts.list_users),
        (iam.PASSWORD_CHANGE, accounts.change_password),
        (iam.GROUP_CREATE, accounts.create_group),
        (iam.GROUP_UPDATE, accounts.update_group),
        (iam.GROUP_DELETE, accounts.delete_group),
        (iam.GROUP_LIST, accounts.list_groups),
        (iam.TOKEN_CREATE, accounts.create_token),
        (iam.TOKEN_UPDATE, accounts.update_token),
        (iam.TOKEN_DELETE, accounts.delete_token),
        (iam.TOKEN_LIST, accounts.list_tokens),
        (iam.TFA_ADD, factors.add_tfa),
        (iam.TFA_DELETE, factors.delete_tfa),
        (iam.TFA_UPDATE, factors.update_tfa),
        (iam.TFA_VERIFY, factors.verify_tfa),
        (iam.TFA_LIST, factors.list_tfa),
        (iam.ROLE_CREATE, access.create_role),
        (iam.ROLE_UPDATE, access.update_role),
        (iam.ROLE_DELETE, access.delete_role),
        (iam.ROLE_LIST, access.list_roles),
        (iam.ACL_UPDATE, access.update_acl),
        (iam.ACL_LIST, access.list_acl),
        (iam.POOL_CREATE, access.create_pool),
        (iam.POOL_UPDATE, access.update_pool),
        (iam.POOL_DELETE, access.delete_pool),
        (iam.POOL_LIST, access.list_pools),
        (iam.DOMAIN_CREATE, access.create_domain),
        (iam.DOMAIN_UPDATE, access.update_domain),
        (iam.DOMAIN_DELETE, access.delete_domain),
        (iam.DOMAIN_LIST, access.list_domains),
    ]


def _handler(operation: Callable[[Any], Any]) -> Callable[[Any, dict[str, str]], Awaitable[Any]]:
    async def handle(message: Any, _headers: dict[str, str]) -> Any:
        result = operation(message)
        return await result if inspect.isawaitable(result) else result

    return handle


async def serve(bus: Bus, service: IamService) -> None:
    """Answer every IAM subject on ``bus`` (any instance of the service may answer)."""
    for subject, operation in routes(service):
        await bus.serve(subject, _handler(operation))
