"""What the HA rounds do to the cluster: locks, documents, and the node's compute agent.

Every method is a coroutine run on the service's event loop; the rounds (in worker threads)
call them through :class:`~rucher.ha.live.env.LiveEnv`. The manager lock is a lease; a fence is
taking the dead node's own lease once it has expired (its watchdog killed its HA guests before
that, see ``services/ha/README.md``); a recovered guest changes owner in the guest registry
under the fence's token; an HA start carries the node lease's current token, which the agent
checks just before it starts QEMU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import msgspec
import nats.errors
import nats.js.errors
import structlog

from rucher.bus import KV, Bus, Entry, RucherError
from rucher.bus.client import new_id
from rucher.bus.codec import decode, encode
from rucher.claims import BusEvents, KvClaimStore
from rucher.guests import GuestRegistry
from rucher.ha.config import FenceHookSettings
from rucher.ha.fence import FenceResult, run_fence_hook
from rucher.ha.live.cache import MANAGER_STATE, lrm_key
from rucher.ha.live.claims import HaClaims
from rucher.ha.live.records import public_status
from rucher.haconfig import HaConfigStore
from rucher.leases import Lease, node_lease_key, node_lease_name
from rucher.proto import compute
from rucher.proto.cluster import NodeCapacity
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord
from rucher.proto.ha import (
    MANAGER_STATUS_PUBLISHED,
    CrmRequest,
    HaLrmStatus,
    HaManagerState,
    HaResources,
    ManagerStatus,
    ManagerStatusPublished,
    RequestedState,
)
from rucher.proto.node import LeaseRecord
from rucher.proto.scheduler import Claim
from rucher.proto.streams import GUESTS, HA, node_lease_bucket
from rucher.proto.task import TaskAccepted, TaskStatus
from rucher.tasks import TaskStore

log = structlog.get_logger("rucher.ha.live.actions")

USER = "root@pam"
MANAGER_LEASE = "ha-manager"
TASK_POLL = 0.1
# A KV message with one of these headers records a removal, not a value.
REMOVAL_HEADERS = frozenset({"KV-Operation", "Nats-Marker-Reason"})


class ActionError(Exception):
    """A resource action failed; the message is readable in the HA log."""


class ClusterActions:
    """Locks, writes and agent calls for one node's HA service."""

    def __init__(
        self,
        bus: Bus,
        *,
        lease_ttl: float,
        epoch: Callable[[], int | None],
        task_timeout: float = 120.0,
        fence_hook: FenceHookSettings | None = None,
    ) -> None:
        self.bus = bus
        self.fence_hook = fence_hook or FenceHookSettings()
        self.hook_runs: dict[str, asyncio.Task[FenceResult | None]] = {}
        self.hook_fenced: set[str] = set()
        self.node = bus.node
        self.lease_ttl = lease_ttl
        self.epoch = epoch
        self.task_timeout = task_timeout
        self.store = HaConfigStore(bus)
        self.registry = GuestRegistry(bus)
        self.tasks = TaskStore(bus)
        self.manager_kv: KV[HaManagerState] = KV(bus, HA, HaManagerState)
        self.lrm_kv: KV[HaLrmStatus] = KV(bus, HA, HaLrmStatus)
        self.manager_lease = Lease.named(bus, MANAGER_LEASE, holder=self.node, ttl=lease_ttl)
        self.fences: dict[str, Lease] = {}
        self.attempted: dict[int, str] = {}
        self.claims = HaClaims(KvClaimStore(bus), BusEvents(bus))

    # --- locks -----------------------------------------------------------------------------

    async def manager_lock(self) -> bool:
        """Take or renew the manager lease."""
        lease = self.manager_lease
        if lease.token is not None:
            try:
                await lease.renew()
            except RucherError as err:
                if err.code is ErrorCode.STALE_TOKEN:
                    return False
                return lease.held  # NATS failing over: still ours by the conservative clock
            return True
        return await lease.try_acquire()

    async def release_manager_lock(self) -> bool:
        """Give the manager lease up."""
        await self.manager_lease.release()
        return True

    @property
    def manager_token(self) -> int:
        """The manager lease's fencing token while held (0 otherwise)."""
        return self.manager_lease.token or 0

    async def fence(self, node: str) -> bool:
        """Take ``node``'s HA lease: possible only once it expired, i.e. the node is fenced.

        The lease is kept (not renewed) so the node cannot take it back before this round's
        decisions are written; it runs out one TTL later.
        """
        held = self.fences.get(node)
        if held is None or not held.held:
            self.hook_fenced.discard(node)
            lease = Lease.named(
                self.bus,
                node_lease_name(node),
                holder=f"{self.node}/ha-manager",
                ttl=self.lease_ttl,
            )
            if not await lease.try_acquire():
                return False
            self.fences[node] = lease
            log.warning("ha_node_fenced", member=node, token=lease.token)
        return self._hook_fenced(node)

    def _hook_fenced(self, node: str) -> bool:
        """With an external fence hook, the node is fenced once the hook also succeeded.

        The hook (an IPMI power-off) covers the one case the watchdog does not: its process and
        its guard both dead while QEMU lives, on a node without ``/dev/watchdog``. It runs in the
        background; the manager asks again every round, and a failed hook is run again.
        """
        if not self.fence_hook.command or node in self.hook_fenced:
            return True
        run = self.hook_runs.get(node)
        if run is None:
            self.hook_runs[node] = asyncio.create_task(run_fence_hook(self.fence_hook, node))
            return False
        if not run.done():
            return False
        del self.hook_runs[node]
        result = run.result()
        if result is not None and result.fenced:
            self.hook_fenced.add(node)
            return True
        log.warning("ha_fence_hook_failed", member=node, reason=result.reason if result else "")
        return False

    def fence_token(self, node: str) -> int:
        """The token under which ``node`` was fenced (0 when it was not)."""
        lease = self.fences.get(node)
        return lease.token or 0 if lease is not None else 0

    # --- documents -------------------------------------------------------------------------

    async def write_manager_state(self, record: HaManagerState, status: ManagerStatus) -> None:
        """Publish the manager's whole state and the Proxmox-visible status."""
        await self.manager_kv.put(MANAGER_STATE, record)
        await self.store.publish_status(status)
        await self.announce(record)

    async def read_manager_state(self) -> HaManagerState | None:
        """The manager's state as stored now (a direct read, not a watch)."""
        entry = await self.manager_kv.get(MANAGER_STATE)
        return entry.value if entry is not None else None

    async def node_leases(self, nodes: list[str]) -> dict[str, LeaseRecord | None]:
        """Each node's HA lease as stored now (direct reads, not a watch)."""
        records = await asyncio.gather(*(self._node_lease(node) for node in nodes))
        return {node: e.value if e else None for node, e in zip(nodes, records, strict=True)}

    async def _node_lease(self, node: str) -> Entry[LeaseRecord] | None:
        kv: KV[LeaseRecord] = KV(self.bus, node_lease_bucket(node), LeaseRecord)
        try:
            return await kv.get(node_lease_key(node))
        except RucherError as err:
            if err.code is not ErrorCode.NOT_FOUND:
                raise
            return None  # the node never made its lease bucket: it never held a lease

    async def guest_records(self, vmids: list[int]) -> dict[int, GuestRecord]:
        """The guests' registry documents as the stream's leader has them (absent ones left out).

        Read from the leader, not a replica: an LRM woken by the manager's announcement must see
        the owner the manager just wrote, and a replica may not have applied it yet.
        """
        records = await asyncio.gather(*(self._leader_guest(vmid) for vmid in vmids))
        return {record.vmid: record for record in records if record is not None}

    async def _leader_guest(self, vmid: int) -> GuestRecord | None:
        try:
            msg = await self.bus.js.get_msg(
                f"KV_{GUESTS.name}", subject=f"$KV.{GUESTS.name}.{vmid}", direct=False
            )
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as err:
            raise RucherError(ErrorCode.UNAVAILABLE, f"guest {vmid}: {err!r}") from err
        removed = msg.headers is not None and bool(set(msg.headers) & REMOVAL_HEADERS)
        if removed or not msg.data:
            return None
        return decode(msg.data, GuestRecord)

    async def announce(self, record: HaManagerState) -> None:
        """Tell every LRM at once that the manager wrote a new state (core NATS, best effort)."""
        event = ManagerStatusPublished(
            event_id=new_id(),
            node=self.node,
            time=time.time(),
            status=public_status(record),
        )
        subject = MANAGER_STATUS_PUBLISHED.to(node=self.node).subject
        await self.bus.nc.publish(subject, encode(event))

    async def write_lrm_status(self, record: HaLrmStatus) -> None:
        """Publish this node's LRM status."""
        await self.lrm_kv.put(lrm_key(self.node), record)

    async def set_requested_state(self, sid: str, state: str) -> None:
        """Change a resource's requested state (the manager's ``stop`` command)."""

        def change(document: HaResources) -> HaResources:
            resource = document.resources.get(sid)
            if resource is None:
                return document
            updated = msgspec.structs.replace(resource, state=RequestedState(state))
            return HaResources(resources={**document.resources, sid: updated})

        await self.store.change_resources(change)

    async def steal(
        self,
        vmid: int,
        from_node: str,
        to_node: str,
        capacity: NodeCapacity | None = None,
        guests: Mapping[int, GuestRecord] | None = None,
    ) -> None:
        """Move a fenced node's guest to its recovery node in the guest registry.

        Idempotent: an earlier attempt whose answer was lost (the registry's event waits for a
        stream leader) may have moved it already, here or to the recovery node that attempt
        chose; a recovering guest runs nowhere until the manager's state names its node, so it
        may move on from there. Anywhere else it may run: the registry refuses (conflict).
        With ``capacity`` given, the guest's room on ``to_node`` is claimed first (``NoRoomError``
        when the node is full: it is not moved there).
        """
        record = await self._leader_guest(vmid)
        if record is None:
            raise ActionError(f"VM {vmid} does not exist")
        if capacity is not None:
            await self.claims.claim(record, to_node, capacity, guests or {}, fenced=from_node)
        if record.node == to_node:
            return
        source = from_node
        if record.node != from_node and record.node == self.attempted.get(vmid):
            source = record.node
            log.info("ha_steal_continued", vmid=vmid, was=record.node, fenced=from_node)
        self.attempted[vmid] = to_node
        await self.registry.transfer(
            vmid, from_node=source, to_node=to_node, token=self.fence_token(from_node)
        )

    async def take_requests(self, requests: list[CrmRequest]) -> None:
        """Delete queued requests the manager has read."""
        for request in requests:
            try:
                await self.store.take_request(request)
            except RucherError as err:
                log.warning("ha_request_not_taken", request=request.id, error=err.message)

    # --- the node's compute agent ----------------------------------------------------------

    async def power_state(self, vmid: int) -> PowerState | None:
        """The guest's state on this node (None when this node's agent does not have it)."""
        try:
            report = await self.bus.request(
                compute.GUEST_STATUS.to(node=self.node),
                compute.VmStatusQuery(vmid=vmid),
                timeout=5.0,
            )
        except RucherError as err:
            if err.code is ErrorCode.NOT_FOUND:  # not this node's guest
                return None
            raise
        return report.status

    async def _run_task(self, what: str, upid: str) -> None:
        deadline = time.monotonic() + self.task_timeout
        while True:
            state = await self.tasks.get(upid)
            if state.status is TaskStatus.STOPPED:
                if state.exitstatus != "OK":
                    raise ActionError(f"{what}: {state.exitstatus}")
                return
            if time.monotonic() > deadline:
                raise ActionError(f"{what}: task {upid} still running")
            await asyncio.sleep(TASK_POLL)

    async def start(self, vmid: int) -> None:
        """Start the guest here under this node's current lease token."""
        epoch = self.epoch()
        if epoch is None:
            raise ActionError("this node holds no HA lease")
        try:
            claim = await self.claims.pending(self.node, vmid)
        except RucherError as err:  # the start must not wait on the allocations store
            log.warning("ha_claim_unreadable", vmid=vmid, error=err.message)
            claim = None
        command = compute.VmStart(
            command_id=new_id(),
            vmid=vmid,
            user=USER,
            fence_lease=node_lease_name(self.node),
            fence_epoch=epoch,
            claim_id=claim.claim_id if claim is not None else None,
        )
        try:
            reply = await self.bus.request(
                compute.GUEST_START.to(node=self.node), command, timeout=30.0
            )
            await self._run_task("start", reply.upid)
        except (RucherError, ActionError) as err:
            if claim is not None:
                await self.claims.release(claim, f"start failed: {err}")
            raise
        if claim is not None:
            await self._confirm(claim)

    async def _confirm(self, claim: Claim) -> None:
        """The recovered guest runs: its claim's room stays held (an expired claim is logged)."""
        try:
            await self.claims.confirm(claim)
        except RucherError as err:
            log.warning("ha_claim_not_confirmed", claim=claim.claim_id, error=err.message)

    async def shutdown(self, vmid: int, timeout: int | None) -> None:
        """Stop the guest here: at once with timeout 0, else ACPI then force after ``timeout``."""
        reply: TaskAccepted
        if timeout == 0:
            command = compute.VmStop(command_id=new_id(), vmid=vmid, user=USER)
            reply = await self.bus.request(
                compute.GUEST_STOP.to(node=self.node), command, timeout=30.0
            )
        else:
            shutdown = compute.VmShutdown(
                command_id=new_id(), vmid=vmid, user=USER, timeout=timeout, force_stop=True
            )
            reply = await self.bus.request(
                compute.GUEST_SHUTDOWN.to(node=self.node), shutdown, timeout=30.0
            )
        await self._run_task("shutdown", reply.upid)

    async def migrate(
        self,
        vmid: int,
        target: str,
        online: bool,
        capacity: NodeCapacity | None = None,
        guests: Mapping[int, GuestRecord] | None = None,
    ) -> None:
        """Move the guest to ``target`` (live when ``online``).

        With ``capacity`` given, the guest's room on ``target`` is claimed first (``NoRoomError``
        when it is full); the target's agent confirms the claim, or releases it when the
        migration fails, as for the scheduler's migrations.
        """
        claim: Claim | None = None
        if capacity is not None:
            record = await self._leader_guest(vmid)
            if record is None:
                raise ActionError(f"VM {vmid} does not exist")
            claim = await self.claims.claim(record, target, capacity, guests or {})
        command = compute.VmMigrate(
            command_id=new_id(),
            vmid=vmid,
            user=USER,
            target=target,
            online=online,
            claim_id=claim.claim_id if claim is not None else None,
            claim_token=claim.token if claim is not None else 0,
        )
        try:
            reply = await self.bus.request(
                compute.GUEST_MIGRATE.to(node=self.node), command, timeout=30.0
            )
        except RucherError:
            if claim is not None:  # the agent never took the migration: nothing releases it
                await self.claims.release(claim, "migration refused")
            raise
        await self._run_task("migrate", reply.upid)
