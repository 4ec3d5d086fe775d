"""Nodes and the services running on them: the service registry's records."""

from __future__ import annotations

import msgspec


class ServiceInstance(msgspec.Struct, frozen=True, kw_only=True):
    """One running service instance, as registered (key ``{service}.{node}.{instance}``)."""

    service: str
    node: str
    instance: str
    version: str
    address: str
    pid: int
    started: float


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a lease key: who holds it, under which fencing token, until when.

    ``token`` is the KV revision of the acquiring write, so it grows with every acquisition
    across the whole bucket; renewals keep it. ``info`` is the holder's payload (the service
    registry stores a :class:`ServiceInstance` there).
    """

    holder: str
    token: int
    ttl: float
    renewed: float
    info: bytes = b""
