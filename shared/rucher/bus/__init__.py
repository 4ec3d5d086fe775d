"""Rucher's bus: typed publish, request/reply, durable consumers and KV over NATS JetStream."""

from rucher.bus.client import Bus
from rucher.bus.errors import RucherError
from rucher.bus.kv import KV, Entry, Operation

__all__ = ["KV", "Bus", "Entry", "Operation", "RucherError"]
