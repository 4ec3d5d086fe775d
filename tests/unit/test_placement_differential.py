"""The vectorized engine against the node-by-node baseline of ops/bench/scheduler.py.

On a random synthetic cluster (GPUs, MIG layouts, storages, flags, affinity), both must agree on
whether each request fits anywhere, and the node the engine picks must pass every check the
baseline makes, one node at a time.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rucher.placement import Options, PlacementError, place

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_scheduler", ROOT / "ops/bench/scheduler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("window", "enough"), [(1024, 1024), (32, 8)])
def test_the_engine_and_the_baseline_agree_on_every_request(bench, window, enough):
    cluster = bench.build_cluster(300, seed=5)
    records = bench.naive_nodes(cluster.view)
    options = Options(window=window, enough=enough)
    refused = 0
    for spec in bench.request_stream(cluster, 1500, seed=6):
        expected = bench.naive_place(records, spec, cluster.view)
        try:
            decision = place(cluster.view, spec, options=options)
        except PlacementError:
            decision = None
        assert (decision is None) == (expected is None), spec
        if decision is None or expected is None:
            refused += 1
            continue
        chosen = records[decision.row]
        assert chosen.schedulable and bench._naive_fits(chosen, spec.resources)
        assert bench._naive_gpus(chosen, spec.resources, cluster.view)[0]
        migs = any(gpu.kind.value == "mig" for gpu in spec.resources.gpus)
        if enough > 300 and not migs:  # everything ranked, by the same weights: the same node
            assert decision.row == expected[0], spec
    assert 0 < refused < 150
