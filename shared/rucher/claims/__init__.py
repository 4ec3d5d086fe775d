"""Claims: resources reserved on a node by compare-and-set, shared by the scheduler and HA.

``ClaimBook`` commits and changes claims; ``Ledger`` derives the view's reservations from the
allocations documents; ``KvClaimStore`` and ``BusEvents`` are the cluster store and the events.
"""

from rucher.claims.book import ClaimBook, Target
from rucher.claims.ledger import GUEST_KEY, Ledger, NodeLedger, active, guest_reservation
from rucher.claims.ledger import reservation as claim_reservation
from rucher.claims.store import BusEvents, ClaimEvents, ClaimStore, KvClaimStore

__all__ = [
    "GUEST_KEY",
    "BusEvents",
    "ClaimBook",
    "ClaimEvents",
    "ClaimStore",
    "KvClaimStore",
    "Ledger",
    "NodeLedger",
    "Target",
    "active",
    "claim_reservation",
    "guest_reservation",
]
