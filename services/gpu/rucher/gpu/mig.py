"""Where a MIG instance goes: the GPU and the placement that keep large profiles possible.

The geometry (legal placements as bitmasks, what each state can still hold) is
:mod:`rucher.placement.mig`, shared with the scheduler; this module only chooses among a node's
GPUs. The broker's allocation and ``ops/bench/gpu.py`` both call :func:`choose_mig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rucher.placement.mig import Geometry
from rucher.proto.gpu import MigInstance, MigPlacement, MigProfile


@dataclass(frozen=True)
class MigChoice:
    """The GPU (index in the candidates given), placement, and the GPU's state after it."""

    gpu: int
    placement: MigPlacement
    state: int


_GEOMETRIES: dict[tuple[object, ...], Geometry] = {}


def geometry_of(profiles: Sequence[MigProfile]) -> Geometry:
    """The geometry of a GPU with this profile table, built once per model."""
    key = tuple(
        sorted((p.name, p.max_instances, tuple((pl.start, pl.size) for pl in p.placements))
               for p in profiles)
    )  # fmt: skip
    found = _GEOMETRIES.get(key)
    if found is None:
        found = _GEOMETRIES[key] = Geometry.from_profiles(profiles)
    return found


def state_of(profiles: Sequence[MigProfile], instances: Sequence[MigInstance]) -> int:
    """The occupancy of a GPU holding ``instances``."""
    names = {p.profile_id: p.name for p in profiles}
    return geometry_of(profiles).state_of(
        (names[instance.profile_id], instance.placement) for instance in instances
    )


def choose_mig(gpus: Sequence[tuple[Geometry, int]], profile: str) -> MigChoice | None:
    """The placement of ``profile`` over GPUs given as (geometry, state) losing the least.

    On each GPU the placement is :meth:`Geometry.best_placement`'s; across GPUs the one whose
    remaining potential drops least wins, and among equals the fullest GPU (best fit), so empty
    GPUs stay whole for 7g and 4g requests. None when no GPU has a legal free placement.
    """
    best: tuple[tuple[int, int, int], MigChoice] | None = None
    for index, (geometry, state) in enumerate(gpus):
        if profile not in geometry.names:
            continue
        found = geometry.best_placement(state, profile)
        if found is None:
            continue
        placement, after = found
        potentials = geometry.potentials
        key = (potentials[state] - potentials[after], potentials[after], index)
        if best is None or key < best[0]:
            best = (key, MigChoice(gpu=index, placement=placement, state=after))
    return None if best is None else best[1]


def first_fit(gpus: Sequence[tuple[Geometry, int]], profile: str) -> MigChoice | None:
    """The baseline: the first GPU in index order, at its lowest legal free start slot."""
    for index, (geometry, state) in enumerate(gpus):
        if profile not in geometry.names:
            continue
        position = geometry.profile(profile)
        if geometry.capacity(state, position) == 0:
            continue
        for mask, placement in zip(
            geometry.masks[position], geometry.placements[position], strict=True
        ):
            if state & mask == 0:
                return MigChoice(gpu=index, placement=placement, state=state | mask)
    return None
