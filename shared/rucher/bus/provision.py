"""Create every stream and KV bucket from ``rucher.proto.streams``, idempotently."""

from __future__ import annotations

import asyncio
import time

import nats.js.errors
import structlog
from nats.js import api

from rucher.bus.client import Bus
from rucher.proto.streams import (
    BUCKETS,
    OBJECT_STORES,
    STREAMS,
    BucketDef,
    ObjectStoreDef,
    Retention,
    StreamDef,
)

log = structlog.get_logger("rucher.bus.provision")

LEADER_PATIENCE = 15.0
# JetStream: "stream name already in use with a different configuration".
_DIFFERENT_CONFIG = 10058


def stream_config(definition: StreamDef, replicas: int) -> api.StreamConfig:
    """The JetStream configuration of a stream definition."""
    return api.StreamConfig(
        name=definition.name,
        description=definition.description,
        subjects=list(definition.subjects),
        retention=api.RetentionPolicy(definition.retention.value),
        max_age=definition.max_age,
        max_bytes=definition.max_bytes,
        duplicate_window=definition.duplicate_window,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
        allow_direct=True,
        discard=api.DiscardPolicy.OLD
        if definition.retention is Retention.LIMITS
        else api.DiscardPolicy.NEW,
    )


def bucket_config(definition: BucketDef, replicas: int) -> api.StreamConfig:
    """The JetStream configuration of the stream behind a KV bucket."""
    return api.StreamConfig(
        name=f"KV_{definition.name}",
        description=definition.description,
        subjects=[f"$KV.{definition.name}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        allow_msg_ttl=definition.per_key_ttl or None,
        subject_delete_marker_ttl=definition.marker_ttl or None,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, definition.max_age) if definition.max_age else 120.0,
        max_age=definition.max_age or None,
        max_msgs_per_subject=definition.history,
        max_msgs=-1,
        max_consumers=-1,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


def object_store_config(definition: ObjectStoreDef, replicas: int) -> api.StreamConfig:
    """The JetStream configuration of the stream behind an object store."""
    return api.StreamConfig(
        name=f"OBJ_{definition.name}",
        description=definition.description,
        subjects=[f"$O.{definition.name}.C.>", f"$O.{definition.name}.M.>"],
        allow_rollup_hdrs=True,
        allow_direct=True,
        discard=api.DiscardPolicy.NEW,
        max_age=definition.max_age,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


async def _ensure(bus: Bus, config: api.StreamConfig) -> None:
    try:
        info = await bus.js.add_stream(config)
    except nats.js.errors.BadRequestError as err:
        if err.err_code != _DIFFERENT_CONFIG:
            raise
        # An older definition exists: bring it to the current one (fields JetStream can update).
        info = await bus.js.update_stream(config)
        log.info("stream_updated", stream=config.name)
    # A new replicated stream takes a moment to elect its leader: until then writes find no
    # responder. Callers count on a provisioned stream being usable.
    deadline = time.monotonic() + LEADER_PATIENCE
    while info.cluster is not None and not info.cluster.leader:
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {config.name} elected no leader in {LEADER_PATIENCE} s")
        await asyncio.sleep(0.05)
        info = await bus.js.stream_info(config.name or "")


async def provision(
    bus: Bus,
    streams: tuple[StreamDef, ...] = STREAMS,
    buckets: tuple[BucketDef, ...] = BUCKETS,
    object_stores: tuple[ObjectStoreDef, ...] = OBJECT_STORES,
    *,
    replicas: int | None = None,
) -> int:
    """Create or update the given streams, buckets and object stores; returns the replicas used.

    Replicas are each definition's wish capped at the cluster size (or ``replicas`` if given).
    """
    size = replicas if replicas is not None else bus.cluster_size()
    for stream in streams:
        await _ensure(bus, stream_config(stream, min(stream.replicas, size)))
    for bucket in buckets:
        await _ensure(bus, bucket_config(bucket, min(bucket.replicas, size)))
    for store in object_stores:
        await _ensure(bus, object_store_config(store, min(store.replicas, size)))
    return size
