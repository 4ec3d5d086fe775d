"""MIG geometry: each GPU model's legal placements as bitmasks, and lookup tables over states.

A MIG GPU's occupancy is a small bitmask: one bit per memory slot (8 on Hopper), plus one bit
per exclusive engine named by a profile suffix (``1g.18gb+me`` takes the single media
extension, which is why the H200 allows only one of them although 7 placements exist). A
profile fits a state when one of its legal placements is disjoint from it. Every state of a
model is enumerated once (2**bits, at most a few thousand), so the scheduler answers "does
profile P fit anywhere on these nodes" and "what is lost by placing it" with table lookups over
whole arrays of GPUs. The GPU broker uses :meth:`Geometry.best_placement` to choose the slot.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from rucher.proto.gpu import MigPlacement, MigProfile

NO_GPU = 0  # the state code of a column that holds no MIG GPU: nothing fits there
MAX_BITS = 12
_SUFFIX = re.compile(r"\+([a-z0-9]+)$")


@dataclass(frozen=True)
class Geometry:
    """One GPU model's MIG profiles, each with its legal placements as bitmasks."""

    names: tuple[str, ...]
    masks: tuple[tuple[int, ...], ...]
    placements: tuple[tuple[MigPlacement, ...], ...]
    max_instances: tuple[int, ...]
    slots: int
    bits: int
    weights: tuple[int, ...] = field(default=())

    @classmethod
    def from_profiles(cls, profiles: Iterable[MigProfile]) -> Geometry:
        """Build the geometry from a GPU's profile table (NVML ids, names, placements)."""
        ordered = sorted(profiles, key=lambda p: (p.name, p.profile_id))
        slots = max((pl.start + pl.size for p in ordered for pl in p.placements), default=0)
        engines = sorted({m.group(1) for p in ordered if (m := _SUFFIX.search(p.name))})
        bits = slots + len(engines)
        if bits > MAX_BITS:
            raise ValueError(f"a MIG geometry of {bits} bits is larger than supported")
        masks: list[tuple[int, ...]] = []
        for profile in ordered:
            match = _SUFFIX.search(profile.name)
            engine = 1 << (slots + engines.index(match.group(1))) if match else 0
            masks.append(
                tuple(((1 << pl.size) - 1) << pl.start | engine for pl in profile.placements)
            )
        sizes = [max((pl.size for pl in p.placements), default=0) for p in ordered]
        return cls(
            names=tuple(p.name for p in ordered),
            masks=tuple(masks),
            placements=tuple(tuple(p.placements) for p in ordered),
            max_instances=tuple(p.max_instances for p in ordered),
            slots=slots,
            bits=bits,
            weights=tuple(size * size for size in sizes),
        )

    @property
    def states(self) -> int:
        """How many occupancy states this geometry has."""
        return 1 << self.bits

    def profile(self, name: str) -> int:
        """The position of profile ``name``; raises KeyError when the model lacks it."""
        return self.names.index(name)

    def state_of(self, instances: Iterable[tuple[str, MigPlacement]]) -> int:
        """The occupancy of GPU instances given as (profile name, placement) pairs."""
        state = 0
        for name, placement in instances:
            position = self.profile(name)
            index = self.placements[position].index(placement)
            state |= self.masks[position][index]
        return state

    def free_placements(self, state: int, name: str) -> list[MigPlacement]:
        """The legal placements of ``name`` that are free in ``state``."""
        position = self.profile(name)
        return [
            placement
            for mask, placement in zip(self.masks[position], self.placements[position], strict=True)
            if state & mask == 0
        ]

    def capacity(self, state: int, position: int) -> int:
        """How many more instances of a profile fit in ``state`` (greedy is exact here)."""
        taken = state
        count = 0
        for mask in self.masks[position]:
            if taken & mask == 0:
                taken |= mask
                count += 1
        return min(count, self.max_instances[position])

    def potential(self, state: int) -> int:
        """What the state can still hold: instances of each profile, weighted by size squared."""
        return sum(
            weight * self.capacity(state, position) for position, weight in enumerate(self.weights)
        )

    @cached_property
    def potentials(self) -> tuple[int, ...]:
        """:meth:`potential` of every state, computed once."""
        return tuple(self.potential(state) for state in range(self.states))

    def best_placement(self, state: int, name: str) -> tuple[MigPlacement, int] | None:
        """The free placement of ``name`` losing the least potential, and the state after it.

        Ties go to the highest start, so small instances gather at the end of the GPU and the
        large placements (which start at slot 0) stay free longest.
        """
        position = self.profile(name)
        best: tuple[int, int, MigPlacement, int] | None = None
        for mask, placement in zip(self.masks[position], self.placements[position], strict=True):
            if state & mask:
                continue
            after = state | mask
            key = (self.potentials[after], placement.start)
            if best is None or key > best[:2]:
                best = (key[0], key[1], placement, after)
        return None if best is None else (best[2], best[3])


@dataclass
class Tables:
    """Lookup tables over every state code of every registered geometry, one row per profile."""

    fit: NDArray[np.bool_]
    cap: NDArray[np.int16]
    next: NDArray[np.int32]
    loss: NDArray[np.float64]
    has: NDArray[np.bool_]


class MigCatalog:
    """Every MIG geometry seen in the cluster, with state codes global across them.

    Code 0 is :data:`NO_GPU`; each geometry owns a contiguous block of codes after it, so a
    node's MIG GPUs are one row of small integers and one table lookup answers for all of them.
    """

    def __init__(self) -> None:
        self.geometries: list[Geometry] = []
        self.offsets: list[int] = []
        self.profiles: dict[str, int] = {}
        self._keys: dict[tuple[object, ...], int] = {}
        self.size = 1
        self.tables = self._build()

    def register(self, profiles: Sequence[MigProfile]) -> int:
        """The geometry id of a GPU with this profile table, registering it on first sight."""
        key = tuple(
            sorted((p.name, tuple((pl.start, pl.size) for pl in p.placements)) for p in profiles)
        )
        found = self._keys.get(key)
        if found is not None:
            return found
        geometry = Geometry.from_profiles(profiles)
        self._keys[key] = len(self.geometries)
        self.geometries.append(geometry)
        self.offsets.append(self.size)
        self.size += geometry.states
        for name in geometry.names:
            self.profiles.setdefault(name, len(self.profiles))
        self.tables = self._build()
        return self._keys[key]

    def code(self, geometry: int, state: int) -> int:
        """The global code of a geometry's local state."""
        return self.offsets[geometry] + state

    def decode(self, code: int) -> tuple[int, int]:
        """The (geometry id, local state) of a global code; :data:`NO_GPU` has none."""
        if code == NO_GPU:
            raise ValueError("the empty column holds no MIG GPU")
        for geometry in range(len(self.geometries) - 1, -1, -1):
            if code >= self.offsets[geometry]:
                return geometry, code - self.offsets[geometry]
        raise ValueError(f"unknown MIG state code {code}")

    def _build(self) -> Tables:
        rows = len(self.profiles)
        tables = Tables(
            fit=np.zeros((rows, self.size), dtype=np.bool_),
            cap=np.zeros((rows, self.size), dtype=np.int16),
            next=np.tile(np.arange(self.size, dtype=np.int32), (rows, 1)),
            loss=np.full((rows, self.size), math.inf),
            has=np.zeros((rows, self.size), dtype=np.bool_),
        )
        for geometry, offset in zip(self.geometries, self.offsets, strict=True):
            potentials = geometry.potentials
            for position, name in enumerate(geometry.names):
                row = self.profiles[name]
                tables.has[row, offset : offset + geometry.states] = True
                for state in range(geometry.states):
                    cap = geometry.capacity(state, position)
                    tables.cap[row, offset + state] = cap
                    if cap == 0:
                        continue
                    best = geometry.best_placement(state, name)
                    assert best is not None
                    after = best[1]
                    tables.fit[row, offset + state] = True
                    tables.next[row, offset + state] = offset + after
                    tables.loss[row, offset + state] = potentials[state] - potentials[after]
        return tables
