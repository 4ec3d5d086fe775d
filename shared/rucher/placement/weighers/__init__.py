"""Weighers: each scores the feasible candidates in [0, 1], higher is better, all at once.

The engine adds the scores up, each times its weight (``engine.DEFAULT_WEIGHTS``). A
*dominant* weigher (node-affinity priorities) is not added: it ranks first, and the others only
choose among the nodes it ranks highest, which is how Proxmox treats rule priorities.
"""

from __future__ import annotations

from rucher.placement.weighers import affinity, crs, fragmentation, load, spread
from rucher.placement.weighers.base import Weigher

WEIGHERS: tuple[Weigher, ...] = (
    affinity.WEIGHER,
    spread.WEIGHER,
    fragmentation.WEIGHER,
    load.WEIGHER,
    crs.WEIGHER,
)

__all__ = ["WEIGHERS", "Weigher"]
