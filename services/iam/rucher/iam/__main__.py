"""The IAM service's composition root: settings, realms, live view, bootstrap, key rotation."""

from __future__ import annotations

import asyncio

from rucher.authz import AuthzView
from rucher.iam.bootstrap import bootstrap
from rucher.iam.config import IamSettings
from rucher.iam.context import Context
from rucher.iam.handlers import serve
from rucher.iam.keys import KeyRotator
from rucher.iam.realms.interface import PasswordRealm
from rucher.iam.realms.openid import provider_cache
from rucher.iam.realms.pam import PamRealm
from rucher.iam.realms.pve import PveRealm
from rucher.iam.service import IamService
from rucher.iam.store import BusAudit, bucket_tables
from rucher.leases import Election
from rucher.proto.iam_state import RealmType
from rucher.registry import instance_key
from rucher.service import ServiceContext, main

KEYS_READY_PATIENCE = 10.0


async def setup(service_context: ServiceContext) -> None:
    """Build the IAM service and serve its subjects."""
    settings = IamSettings.from_env(service_context.settings)
    bus = service_context.bus
    view = AuthzView(bus)
    await view.start()
    service_context.on_stop(view.stop)
    context = Context(
        tables=bucket_tables(bus),
        view=view,
        audit=BusAudit(bus),
        settings=settings,
        node=bus.node,
    )
    keys_ready = asyncio.Event()
    view.on_rebuild(lambda _generation: keys_ready.set() if view.ticket_keys else None)
    await bootstrap(context)
    if view.ticket_keys is None:
        async with asyncio.timeout(KEYS_READY_PATIENCE):
            await keys_ready.wait()
    realms: dict[RealmType, PasswordRealm] = {
        RealmType.PVE: PveRealm(),
        RealmType.PAM: PamRealm(settings.pam_service),
    }
    service = IamService(context, realms, provider_cache(settings.oidc_timeout))
    rotator = KeyRotator(context.tables.keys, settings.key_rotation)
    election = Election(
        bus,
        "iam-ticket-keys",
        candidate=instance_key(service_context.instance),
        ttl=settings.base.registry_ttl,
        on_elected=rotator.start,
        on_demoted=rotator.stop,
    )
    election.start()
    service_context.on_stop(election.stop)
    await serve(bus, service)


if __name__ == "__main__":
    main("iam", setup)
