"""The HA service's subscriptions: node capacity events, and the manager's announcements.

The status the API shows (``/cluster/ha/status/current`` and ``manager_status``) is read by the
gateway straight from the ``ha`` bucket, where the elected manager writes it every round: it
needs no request/reply subject here.
"""

from __future__ import annotations

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.client import JetStreamContext

from rucher.bus import Bus, RucherError
from rucher.bus.codec import decode
from rucher.ha.service import HaService
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED
from rucher.proto.ha import MANAGER_STATUS_PUBLISHED
from rucher.proto.streams import EVENTS

log = structlog.get_logger("rucher.ha.handlers")


async def follow_capacity(bus: Bus, service: HaService) -> JetStreamContext.PushSubscription:
    """Feed every node's published capacity to the service."""

    async def on_capacity(msg: Msg) -> None:
        try:
            event = decode(msg.data, NODE_CAPACITY_PUBLISHED.payload)
        except RucherError:
            log.warning("event_unreadable", subject=msg.subject)
            return
        service.capacity_published(event.capacity)

    return await bus.js.subscribe(
        NODE_CAPACITY_PUBLISHED.wildcard(),
        stream=EVENTS.name,
        cb=on_capacity,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        inactive_threshold=300.0,
    )


async def follow_manager(bus: Bus, service: HaService) -> Subscription:
    """Wake this node's LRM as soon as the manager announces a new state (core NATS)."""

    async def on_status(_: Msg) -> None:
        service.manager_announced()

    return await bus.nc.subscribe(MANAGER_STATUS_PUBLISHED.wildcard(), cb=on_status)
