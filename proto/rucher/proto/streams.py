"""The one definitions module for every JetStream stream and KV bucket Rucher uses.

Every service creates what it needs from here, idempotently, at start (``rucher.bus.provision``),
so definitions never drift between services. ``replicas`` is the wanted replica count, capped at
the size of the NATS cluster actually reached. ``writers`` is documentation held by the code: who
may write (the AsyncAPI document and proto/README.md are generated from it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum

DAY = 86_400.0


class Retention(StrEnum):
    """JetStream retention policies, by the names the server uses."""

    LIMITS = "limits"
    WORK_QUEUE = "workqueue"


@dataclass(frozen=True)
class StreamDef:
    """A JetStream stream: its subjects, retention and who writes and reads it."""

    name: str
    subjects: tuple[str, ...]
    retention: Retention
    max_age: float
    max_bytes: int
    duplicate_window: float
    replicas: int
    writers: str
    readers: str
    description: str


@dataclass(frozen=True)
class BucketDef:
    """A JetStream KV bucket: history, TTLs and who writes it.

    ``per_key_ttl`` enables per-message TTLs; expired keys then leave a delete marker (kept for
    ``marker_ttl`` seconds) that watchers receive, which is how lease expiry is observed.
    """

    name: str
    history: int
    max_age: float
    replicas: int
    per_key_ttl: bool
    writers: str
    description: str
    marker_ttl: float = 0.0


EVENTS = StreamDef(
    name="EVENTS",
    subjects=("evt.>",),
    retention=Retention.LIMITS,
    max_age=7 * DAY,
    max_bytes=1 << 30,
    duplicate_window=120.0,
    replicas=3,
    writers="each service, for the events of its own bounded context",
    readers="any service, through durable or ordered consumers",
    description="Everything that happened in the cluster, past tense, de-duplicated by event id.",
)

COMMANDS = StreamDef(
    name="COMMANDS",
    subjects=("cmd.>",),
    retention=Retention.WORK_QUEUE,
    max_age=1 * DAY,
    max_bytes=256 << 20,
    duplicate_window=120.0,
    replicas=3,
    writers="the gateway and services that hand durable work to another service",
    readers="the owning service: one durable pull consumer per subject filter",
    description="Durable commands that survive their consumer's restart; removed once acked.",
)

TASKLOG = StreamDef(
    name="TASKLOG",
    subjects=("tasklog.>",),
    retention=Retention.LIMITS,
    max_age=30 * DAY,
    max_bytes=1 << 30,
    duplicate_window=120.0,
    replicas=3,
    writers="the task runner of the worker executing the task",
    readers="the gateway (GET .../tasks/{upid}/log) and operators",
    description="Task log lines, one message per line, subject tasklog.{node}.{upid token}.",
)

AUDIT = StreamDef(
    name="AUDIT",
    subjects=("audit.>",),
    retention=Retention.LIMITS,
    max_age=365 * DAY,
    max_bytes=1 << 30,
    duplicate_window=120.0,
    replicas=3,
    writers="the IAM service: a copy of every security event, on audit.iam.* instead of evt.iam.*",
    readers="operators and auditors",
    description="The security audit trail: logins, and user, group, role, ACL and token changes.",
)

STREAMS: tuple[StreamDef, ...] = (EVENTS, COMMANDS, TASKLOG, AUDIT)

TASKS = BucketDef(
    name="tasks",
    history=1,
    max_age=30 * DAY,
    replicas=3,
    per_key_ttl=False,
    writers="the task runner owning the task; the task reaper for tasks whose worker died",
    description="Task state by UPID token: status, exit status, worker, times.",
)

GUESTS = BucketDef(
    name="guests",
    history=8,
    max_age=0.0,
    replicas=3,
    per_key_ttl=False,
    writers="the guest registry library in the owning agent, by compare-and-set",
    description="One config document per guest, key = VMID: owner node, config, digest, lock.",
)

LEASES = BucketDef(
    name="leases",
    history=1,
    max_age=0.0,
    replicas=3,
    per_key_ttl=True,
    marker_ttl=60.0,
    writers="the current holder of each lease (acquire, renew, release), by compare-and-set",
    description="Named leases and leader elections: holder, fencing token, expiry.",
)

NODE_LEASES = BucketDef(
    name="ha-node-{node}",
    history=1,
    max_age=0.0,
    replicas=3,
    per_key_ttl=True,
    marker_ttl=60.0,
    writers="the node's HA watchdog (its lease, by compare-and-set); the HA manager fencing it",
    description="One bucket per node, holding only that node's HA lease; its Raft leader is kept "
    "on the node's own NATS server, so losing another server never stalls the node's renewals.",
)


def node_lease_bucket(node: str) -> BucketDef:
    """``node``'s own lease bucket (characters a bucket name cannot hold become ``_XX``)."""
    safe = re.sub(r"[^A-Za-z0-9-]", lambda m: "".join(f"_{b:02x}" for b in m[0].encode()), node)
    return replace(NODE_LEASES, name=NODE_LEASES.name.format(node=safe))


SERVICES = BucketDef(
    name="services",
    history=1,
    max_age=0.0,
    replicas=3,
    per_key_ttl=True,
    marker_ttl=60.0,
    writers="each service instance, for its own key, through the lease primitive",
    description="The service registry: key service.node.instance, heartbeated as a lease.",
)

IDEMPOTENCY = BucketDef(
    name="idempotency",
    history=1,
    max_age=600.0,
    replicas=3,
    per_key_ttl=False,
    writers="the bus library, recording the reply to each command id it has applied",
    description="Replies to already-applied commands, so a retried command is applied once.",
)

IAM = BucketDef(
    name="iam",
    history=8,
    max_age=0.0,
    replicas=3,
    per_key_ttl=True,
    writers="the IAM service, by compare-and-set; the IAM leader rotates keys.ticket daily",
    description="Users, groups, custom roles, ACL entries, API tokens, pools, realms, ticket keys.",
)

ALLOCATIONS = BucketDef(
    name="allocations",
    history=1,
    max_age=0.0,
    replicas=3,
    per_key_ttl=False,
    writers="every scheduler instance and the HA manager, by compare-and-set on the revision read",
    description="One document per node: every claim holding its resources, pending or confirmed.",
)

CLAIMS = BucketDef(
    name="claims",
    history=1,
    max_age=0.0,
    replicas=3,
    per_key_ttl=True,
    marker_ttl=60.0,
    writers="the scheduler that made the claim; deleted on confirmation or release",
    description="Unconfirmed claims by id, each with a per-key TTL: expiry releases the claim.",
)

STORAGE = BucketDef(
    name="storage",
    history=8,
    max_age=0.0,
    replicas=3,
    per_key_ttl=False,
    writers="the storage service (any instance), by compare-and-set",
    description="Cluster-wide storage definitions (Proxmox storage.cfg), key = storage id.",
)

MAPPINGS = BucketDef(
    name="mappings",
    history=8,
    max_age=0.0,
    replicas=3,
    per_key_ttl=False,
    writers="the GPU broker (any instance), by compare-and-set",
    description="Cluster-wide resource mappings (/cluster/mapping), key = pci.{mapping id}.",
)

GPU_LEASES = BucketDef(
    name="gpu_leases",
    history=1,
    max_age=0.0,
    replicas=3,
    per_key_ttl=False,
    writers="the GPU broker of the node holding the device, for that node's keys only",
    description="Device, mdev, MIG and VF leases held by guests, key = {node}.{lease id}.",
)

HA = BucketDef(
    name="ha",
    history=8,
    max_age=0.0,
    replicas=3,
    per_key_ttl=False,
    writers="the gateway (resources, rules, groups, control, command.*), by compare-and-set; "
    "the elected HA manager (manager_status, and deletes the command.* it has read)",
    description="HA configuration (Proxmox resources.cfg, rules.cfg, groups.cfg), the "
    "administrator's arm/disarm and maintenance wishes, queued migrate/relocate requests, and "
    "the manager's status.",
)

# Created per node by the node's HA service (``node_lease_bucket``), not at start.
BUCKET_FAMILIES: tuple[BucketDef, ...] = (NODE_LEASES,)

BUCKETS: tuple[BucketDef, ...] = (
    TASKS,
    GUESTS,
    LEASES,
    SERVICES,
    IDEMPOTENCY,
    IAM,
    ALLOCATIONS,
    CLAIMS,
    STORAGE,
    MAPPINGS,
    GPU_LEASES,
    HA,
)


@dataclass(frozen=True)
class ObjectStoreDef:
    """A JetStream object store: byte streams too large for one message, chunked by NATS."""

    name: str
    max_age: float
    replicas: int
    writers: str
    description: str


UPLOADS = ObjectStoreDef(
    name="uploads",
    max_age=1 * DAY,
    replicas=3,
    writers="the gateway (an ISO, template or image upload, chunked and SHA-256 checked)",
    description="Uploads in transit to the storage service, which deletes each once stored.",
)

OBJECT_STORES: tuple[ObjectStoreDef, ...] = (UPLOADS,)
