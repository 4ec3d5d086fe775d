"""The service registry: every service instance registers and heartbeats through a lease."""

from __future__ import annotations

import os
import time
import uuid

from rucher.bus import KV, Bus
from rucher.bus.codec import decode, encode
from rucher.leases import Callback, Lease
from rucher.proto.keys import encode_token, make_key
from rucher.proto.node import LeaseRecord, ServiceInstance
from rucher.proto.streams import SERVICES

DEFAULT_TTL = 15.0  # above the 4-10 s a NATS fail-over takes here


def instance_key(instance: ServiceInstance) -> str:
    """The registry key of an instance: ``{service}.{node}.{instance}``."""
    return make_key(instance.service, instance.node, instance.instance)


def describe_self(bus: Bus, *, address: str = "") -> ServiceInstance:
    """This process as a service instance (a fresh instance id per process)."""
    return ServiceInstance(
        service=bus.service,
        node=bus.node,
        instance=uuid.uuid4().hex[:12],
        version=bus.version,
        address=address,
        pid=os.getpid(),
        started=time.time(),
    )


class ServiceRegistry:
    """Register this process, and list what runs where."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.kv: KV[LeaseRecord] = KV(bus, SERVICES, LeaseRecord)

    async def register(
        self,
        instance: ServiceInstance,
        *,
        ttl: float = DEFAULT_TTL,
        on_lost: Callback | None = None,
    ) -> Lease:
        """Hold this instance's registration lease, renewed in the background."""
        lease = Lease(
            self.bus,
            instance_key(instance),
            holder=instance.instance,
            ttl=ttl,
            bucket=SERVICES,
            info=encode(instance),
            on_lost=on_lost,
        )
        await lease.acquire(timeout=ttl * 2)
        lease.keep()
        return lease

    async def instances(
        self, service: str | None = None, node: str | None = None
    ) -> list[ServiceInstance]:
        """Registered instances, optionally of one service and/or on one node."""
        pattern = ".".join(
            (encode_token(service) if service else "*", encode_token(node) if node else "*", "*")
        )
        return [
            decode(entry.value.info, ServiceInstance)
            for entry in await self.kv.entries(pattern)
            if entry.value is not None
        ]

    async def alive_keys(self) -> set[str]:
        """Registry keys of every instance registered now."""
        return {entry.key for entry in await self.kv.entries()}
