"""What is known to be held on each node: allocations documents, guests, claims in flight.

A node's row in the cluster view is always derived from three things: the last allocations
document read for it (claims still pending or confirmed, at a known revision), the guests that
run there without a claim (created outside the scheduler), and this process's own claims whose
write is still in flight. A claim is validated against exactly the revision it is written on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rucher.placement import ClusterView, Reservation
from rucher.proto.guest import GuestType
from rucher.proto.scheduler import Claim, NodeAllocations, ResourceRequest

GUEST_KEY = "guest:"


@dataclass
class NodeLedger:
    """One node: its allocations document at ``revision``, and what is in flight for it."""

    document: NodeAllocations | None = None
    revision: int = 0
    inflight: dict[str, Reservation] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def active(document: NodeAllocations | None, now: float) -> list[Claim]:
    """The claims of a document that still hold resources at ``now``."""
    if document is None:
        return []
    return [claim for claim in document.claims if claim.confirmed or claim.expires > now]


def reservation(claim: Claim, *, gpu_applied: bool = False) -> Reservation:
    """What a claim holds, in the view's terms."""
    return Reservation(
        key=claim.claim_id,
        vmid=claim.vmid,
        resources=claim.resources,
        guest_type=claim.guest_type,
        gpu_applied=gpu_applied,
        node_affinity=claim.node_affinity,
        resource_affinity=claim.resource_affinity,
    )


def guest_reservation(vmid: int, guest_type: GuestType, config: dict[str, str]) -> Reservation:
    """What a guest created outside the scheduler holds, from its Proxmox config."""

    def integer(key: str, default: int) -> int:
        try:
            return int(config.get(key, default))
        except ValueError:
            return default

    vcpus = integer("cores", 1) * (integer("sockets", 1) if guest_type is GuestType.QEMU else 1)
    memory = integer("memory", 512) << 20
    return Reservation(
        key=f"{GUEST_KEY}{vmid}",
        vmid=vmid,
        resources=ResourceRequest(vcpus=max(1, vcpus), memory=memory),
        guest_type=guest_type,
        gpu_applied=True,
    )


class Ledger:
    """Every node's ledger, and the view rows derived from them."""

    def __init__(self, view: ClusterView, clock: Callable[[], float]) -> None:
        self.view = view
        self.clock = clock
        self.nodes: dict[str, NodeLedger] = {}
        self.claim_nodes: dict[str, str] = {}
        self.guests: dict[str, dict[int, Reservation]] = {}
        self.applied: dict[str, frozenset[str]] = {}

    def node(self, name: str) -> NodeLedger:
        """The ledger of ``name``, created empty on first use."""
        found = self.nodes.get(name)
        if found is None:
            found = self.nodes[name] = NodeLedger()
        return found

    def observe(self, name: str, document: NodeAllocations | None, revision: int) -> bool:
        """Take a document read or written at ``revision``; older news is ignored."""
        ledger = self.node(name)
        if revision < ledger.revision:
            return False
        if ledger.document is not None:
            for claim in ledger.document.claims:
                self.claim_nodes.pop(claim.claim_id, None)
        ledger.document, ledger.revision = document, revision
        for claim in document.claims if document is not None else ():
            self.claim_nodes[claim.claim_id] = name
        self.derive(name)
        return True

    def hold(self, name: str, held: Reservation) -> None:
        """A claim of this process is being written: count it at once."""
        self.node(name).inflight[held.key] = held
        self.derive(name)

    def unhold(self, name: str, key: str) -> None:
        """The claim's write ended (in the document now, or abandoned)."""
        if self.node(name).inflight.pop(key, None) is not None:
            self.derive(name)

    def set_guest(self, name: str, guest: Reservation | None, vmid: int) -> None:
        """A guest created outside the scheduler runs on ``name`` (or no longer does)."""
        guests = self.guests.setdefault(name, {})
        if guest is None:
            if guests.pop(vmid, None) is not None:
                self.derive(name)
            return
        guests[vmid] = guest
        self.derive(name)

    def set_applied(self, name: str, claim_ids: Iterable[str]) -> None:
        """The claims the node's GPU inventory already shows allocated."""
        self.applied[name] = frozenset(claim_ids)
        self.derive(name)

    def derive(self, name: str) -> None:
        """Rebuild the node's view row from its ledger."""
        ledger = self.node(name)
        applied = self.applied.get(name, frozenset())
        held = [
            reservation(claim, gpu_applied=claim.claim_id in applied)
            for claim in active(ledger.document, self.clock())
        ]
        claimed = {r.vmid for r in held}
        keys = {r.key for r in held}
        held += [g for vmid, g in self.guests.get(name, {}).items() if vmid not in claimed]
        held += [r for key, r in ledger.inflight.items() if key not in keys]
        self.view.set_reservations(name, held)

    def expiring(self, now: float, grace: float = 0.0) -> list[str]:
        """Nodes with a pending claim whose time ran out more than ``grace`` seconds ago."""
        return [
            name
            for name, ledger in self.nodes.items()
            if ledger.document is not None
            and any(not c.confirmed and c.expires <= now - grace for c in ledger.document.claims)
        ]
