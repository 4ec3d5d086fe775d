"""MIG geometry against the real H200 tables: legal placements only, never overlapping."""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from rucher.placement.mig import NO_GPU, Geometry, MigCatalog
from rucher.proto.gpu import MigInstance, MigPlacement, MigProfile

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT.parent / "shared" / "fixtures" / "gpu" / "h200"


@functools.cache
def h200_placements() -> dict[int, tuple[MigPlacement, ...]]:
    """``nvidia-smi mig -lgipp``: profile id -> legal placements."""
    text = (H200 / "smi-misc.txt").read_text()
    found = {}
    for match in re.finditer(r"Profile ID\s+(\d+) Placements?\s*:\s*\{([\d,]+)\}:(\d+)", text):
        size = int(match.group(3))
        starts = [int(start) for start in match.group(2).split(",")]
        found[int(match.group(1))] = tuple(MigPlacement(start=s, size=size) for s in starts)
    return found


@functools.cache
def h200_totals() -> dict[str, int]:
    """``nvidia-smi mig -lgip``: profile name -> instances a GPU can hold (Free/Total)."""
    text = (H200 / "smi-misc.txt").read_text()
    return {name: int(total) for name, total in re.findall(r"MIG (\S+)\s+\d+\s+\d+/(\d+)", text)}


@functools.cache
def h200_profiles() -> tuple[MigProfile, ...]:
    """The H200's GPU-instance profiles as the broker publishes them (NVML + placements)."""
    nvml = json.loads((H200 / "nvml.json").read_text())
    placements = h200_placements()
    profiles = []
    for value in nvml["gpus"][0]["gpu_instance_profiles"].values():
        if not isinstance(value, dict):
            continue
        profiles.append(
            MigProfile(
                profile_id=value["id"],
                name=value["name"].removeprefix("MIG "),
                slices=value["sliceCount"],
                max_instances=value["instanceCount"],
                memory=value["memorySizeMB"] << 20,
                multiprocessors=value["multiprocessorCount"],
                placements=placements[value["id"]],
            )
        )
    return tuple(sorted(profiles, key=lambda p: p.profile_id))


def h200_instances(layout: list[tuple[str, int]]) -> tuple[MigInstance, ...]:
    """MIG instances for (profile name, start slot) pairs, as the broker lists them."""
    by_name = {p.name: p for p in h200_profiles()}
    return tuple(
        MigInstance(
            gpu_instance_id=index,
            profile_id=by_name[name].profile_id,
            placement=next(pl for pl in by_name[name].placements if pl.start == start),
        )
        for index, (name, start) in enumerate(layout)
    )


def geometry() -> Geometry:
    return Geometry.from_profiles(h200_profiles())


def test_the_fixture_tables_are_the_h200s():
    assert h200_placements()[19] == tuple(MigPlacement(start=s, size=1) for s in range(7))
    assert h200_placements()[9] == (MigPlacement(start=0, size=4), MigPlacement(start=4, size=4))
    assert h200_placements()[0] == (MigPlacement(start=0, size=8),)
    assert {p.name for p in h200_profiles()} == set(h200_totals())


def test_an_empty_h200_holds_exactly_the_instances_nvidia_smi_reports():
    shape = geometry()
    for position, name in enumerate(shape.names):
        assert shape.capacity(0, position) == h200_totals()[name], name


def test_masks_cover_exactly_the_legal_placements():
    shape = geometry()
    assert shape.slots == 8
    for position, name in enumerate(shape.names):
        profile = next(p for p in h200_profiles() if p.name == name)
        for mask, placement in zip(shape.masks[position], profile.placements, strict=True):
            slots = mask & 0xFF
            assert slots == ((1 << placement.size) - 1) << placement.start
            assert (mask >> 8 != 0) == name.endswith("+me")


def _legal(state: int, shape: Geometry, layout: list[tuple[str, MigPlacement]]) -> bool:
    """Whether ``layout`` (profile, placement) is a set of disjoint legal placements."""
    used = 0
    for name, placement in layout:
        position = shape.profile(name)
        assert placement in shape.placements[position]
        mask = shape.masks[position][shape.placements[position].index(placement)]
        if used & mask:
            return False
        used |= mask
    return used == state


def test_random_allocations_and_releases_stay_legal_and_never_overlap():
    shape = geometry()
    rng = random.Random(7)
    for _ in range(200):
        layout: list[tuple[str, MigPlacement]] = []
        state = 0
        for _ in range(30):
            if layout and rng.random() < 0.3:
                layout.pop(rng.randrange(len(layout)))
                state = shape.state_of(layout)
                continue
            name = rng.choice(shape.names)
            best = shape.best_placement(state, name)
            free = shape.free_placements(state, name)
            if best is None:
                assert free == []
                continue
            placement, after = best
            assert placement in free
            layout.append((name, placement))
            state = after
            assert _legal(state, shape, layout)
            counts = {n: sum(1 for m, _ in layout if m == n) for n in shape.names}
            assert all(counts[n] <= h200_totals()[n] for n in shape.names)


def test_the_media_extension_profile_fits_once_per_gpu():
    shape = geometry()
    first = shape.best_placement(0, "1g.18gb+me")
    assert first is not None
    assert shape.best_placement(first[1], "1g.18gb+me") is None
    assert shape.best_placement(first[1], "1g.18gb") is not None


def test_small_instances_go_where_they_keep_large_profiles_possible():
    shape = geometry()
    one = shape.best_placement(0, "1g.18gb")
    assert one is not None and one[0] == MigPlacement(start=6, size=1)
    # 4g.71gb and 3g.71gb at slot 0 stay possible; a first-fit at slot 0 would end both.
    assert shape.free_placements(one[1], "4g.71gb") == [MigPlacement(start=0, size=4)]
    half = shape.best_placement(0, "3g.71gb")
    assert half is not None and half[0] == MigPlacement(start=4, size=4)
    assert shape.best_placement(0, "7g.141gb") == (MigPlacement(start=0, size=8), 0xFF)


def test_catalog_tables_agree_with_the_geometry_for_every_state():
    catalog = MigCatalog()
    geometry_id = catalog.register(h200_profiles())
    assert catalog.register(h200_profiles()[::-1]) == geometry_id  # same model, same geometry
    shape = catalog.geometries[geometry_id]
    tables = catalog.tables
    for name in shape.names:
        row = catalog.profiles[name]
        assert not tables.fit[row, NO_GPU]
        for state in range(shape.states):
            code = catalog.code(geometry_id, state)
            assert catalog.decode(code) == (geometry_id, state)
            best = shape.best_placement(state, name)
            assert bool(tables.fit[row, code]) == (best is not None)
            assert tables.cap[row, code] == shape.capacity(state, shape.profile(name))
            if best is not None:
                assert catalog.decode(int(tables.next[row, code])) == (geometry_id, best[1])
                assert tables.loss[row, code] >= 0
            else:
                assert np.isinf(tables.loss[row, code])


def test_a_second_model_gets_its_own_codes_and_unknown_profiles_never_fit():
    catalog = MigCatalog()
    h200 = catalog.register(h200_profiles())
    small = catalog.register(
        (
            MigProfile(
                profile_id=1,
                name="1g.10gb",
                slices=1,
                max_instances=2,
                memory=10 << 30,
                placements=(MigPlacement(start=0, size=1), MigPlacement(start=1, size=1)),
            ),
        )
    )
    assert small != h200
    row = catalog.profiles["1g.10gb"]
    assert catalog.tables.fit[row, catalog.code(small, 0)]
    assert not catalog.tables.fit[row, catalog.code(h200, 0)]
    assert not catalog.tables.fit[catalog.profiles["7g.141gb"], catalog.code(small, 0)]


def test_state_of_reads_the_instances_a_broker_reports():
    shape = geometry()
    names = {p.profile_id: p.name for p in h200_profiles()}
    layout = h200_instances([("3g.71gb", 4), ("1g.18gb+me", 0)])
    state = shape.state_of((names[i.profile_id], i.placement) for i in layout)
    assert state & 0xFF == 0b11110001
    assert shape.free_placements(state, "1g.18gb+me") == []
    with pytest.raises(ValueError, match="not in tuple"):
        shape.state_of([("3g.71gb", MigPlacement(start=2, size=4))])
