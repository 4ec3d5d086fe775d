"""Create every stream and KV bucket from ``rucher.proto.streams``, idempotently."""

from __future__ import annotations

import asyncio
import json
import time

import nats.errors
import nats.js.errors
import structlog
from nats.js import api

from rucher.bus.client import Bus
from rucher.bus.errors import RucherError
from rucher.proto.errors import ErrorCode
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
CREATE_PATIENCE = 30.0
_UNANSWERED = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
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


async def _create_or_update(bus: Bus, config: api.StreamConfig) -> api.StreamInfo:
    try:
        return await bus.js.add_stream(config)
    except nats.js.errors.BadRequestError as err:
        if err.err_code != _DIFFERENT_CONFIG:
            raise
    # An older definition exists: bring it to the current one (fields JetStream can update).
    info = await bus.js.update_stream(config)
    log.info("stream_updated", stream=config.name)
    return info


async def _ensure(bus: Bus, config: api.StreamConfig) -> None:
    # Creating is idempotent, so an unanswered request (the metadata leader busy or being
    # elected, as on a loaded machine while every service of a node starts) is sent again.
    deadline = time.monotonic() + CREATE_PATIENCE
    while True:
        try:
            info = await _create_or_update(bus, config)
            break
        except _UNANSWERED as err:
            if time.monotonic() > deadline:
                raise
            log.warning("stream_create_retried", stream=config.name, error=repr(err))
            await asyncio.sleep(0.25)
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


# How recently the leader must have heard from this server for a hand-over to land here, in
# seconds; under nats-server's own limit (three 1 s heartbeats) with room for the request's way.
TRANSFER_SEEN_WITHIN = 2.0


def _takes_over(replica: api.PeerInfo, here: str) -> bool:
    """Whether the leader would hand over to ``replica``: this server, current, online, seen lately.

    ``active`` is the time since the leader last heard from the peer, 0 when it never has.
    """
    seen_ns = replica.active or 0
    return (
        replica.name == here
        and bool(replica.current)
        and not replica.offline
        and 0 < seen_ns < TRANSFER_SEEN_WITHIN * 1e9
    )


async def lead_here(bus: Bus, stream: str, *, timeout: float = 2.0) -> str:
    """Move ``stream``'s Raft leader to the server this connection is on; returns the leader.

    A stream whose leader is a node's own server stays writable from that node while any other
    server is lost. The current leader is asked to step down in favour of this server (JetStream's
    preferred placement); nothing is asked when it already leads here, when the stream has no
    leader (an election runs), or when this server is not a current replica the leader heard from
    within ``TRANSFER_SEEN_WITHIN``: a leader hands over only to a peer seen within three Raft
    heartbeats (3 s) and otherwise gives the lead to any other peer, or to none, which would move
    it away from everyone for an election and ask again (seen in CI: never led here in 20 s).
    """
    here = bus.server_name
    try:
        info = await bus.js.stream_info(stream)
        cluster = info.cluster
        if cluster is None:
            return here  # a lone server leads everything
        if not here or not cluster.leader or cluster.leader == here:
            return cluster.leader or ""
        if not any(_takes_over(replica, here) for replica in cluster.replicas or []):
            return cluster.leader
        request = {"placement": {"preferred": here}}
        reply = await bus.nc.request(
            f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
            json.dumps(request).encode(),
            timeout=timeout,
        )
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as err:
        raise RucherError(ErrorCode.UNAVAILABLE, f"{stream}: leader unknown: {err}") from err
    answer = json.loads(reply.data)
    if "error" in answer:
        raise RucherError(
            ErrorCode.UNAVAILABLE,
            f"{stream}: leader not moved to {here}: {answer['error'].get('description', '')}",
        )
    log.info("stream_leader_moved", stream=stream, leader=here, was=cluster.leader)
    return here
