"""GPU broker benchmark: MIG requests satisfied by the broker's placement against first-fit.

Run: .venv/bin/python ops/bench/gpu.py [--gpus 16] [--requests 100000] [--load 1.2] [--seed S]

One seeded random stream of MIG requests is replayed through two policies on the same hosts:
16 H200-shaped GPUs (the real profile and placement tables of shared/fixtures/gpu/h200, as
``ops/bench/scheduler.py`` holds them), profiles drawn uniformly from the H200's seven
GPU-instance profiles, Poisson arrivals, exponentially distributed lifetimes (mean 1), and an
offered load of 120% of the GPUs' memory slices (arrival rate x mean lifetime x mean slices per
request = 1.2 x slices in all). Each request is placed when it arrives and released when its
lifetime ends; a request that does not fit is refused, never queued.

- broker: ``rucher.gpu.mig.choose_mig``, the function the broker's allocation calls (each GPU's
  placement losing the least potential, the GPU losing the least, the fullest among equals);
- first-fit: GPUs in index order, the lowest legal free start slot.

The broker must satisfy every request that has a legal free placement anywhere (checked on every
refusal). Printed per policy: the share of all requests satisfied and the share of large ones
(4g and 7g profiles). Target: large_ratio >= 1.2 with overall_delta >= 0.

Last line: RESULT large_ratio=<x> overall_delta=<y>
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scheduler import H200_PROFILES

from rucher.gpu.mig import MigChoice, choose_mig, first_fit, geometry_of
from rucher.placement.mig import Geometry

LARGE = ("4g.71gb", "7g.141gb")
Policy = Callable[[Sequence[tuple[Geometry, int]], str], MigChoice | None]


@dataclass(frozen=True)
class Request:
    """One MIG request of the stream: when it arrives, what it asks, how long it holds it."""

    time: float
    profile: str
    lifetime: float


@dataclass
class Outcome:
    """What one policy satisfied."""

    satisfied: int = 0
    large_total: int = 0
    large_satisfied: int = 0
    seconds: float = 0.0


def stream(count: int, gpus: int, load: float, seed: int) -> list[Request]:
    """The seeded request stream at ``load`` times the GPUs' memory slices."""
    rng = random.Random(seed)
    profiles = [p.name for p in H200_PROFILES]
    sizes = {p.name: p.placements[0].size for p in H200_PROFILES}
    mean_size = sum(sizes.values()) / len(sizes)
    slots = geometry_of(H200_PROFILES).slots
    rate = load * gpus * slots / mean_size  # arrivals per unit of mean lifetime
    now = 0.0
    requests = []
    for _ in range(count):
        now += rng.expovariate(rate)
        requests.append(Request(now, rng.choice(profiles), rng.expovariate(1.0)))
    return requests


def replay(requests: Sequence[Request], gpus: int, policy: Policy, *, strict: bool) -> Outcome:
    """Place and release the stream with ``policy``; ``strict`` checks every refusal."""
    geometry = geometry_of(H200_PROFILES)
    states = [0] * gpus
    masks = {name: geometry.masks[geometry.profile(name)] for name in geometry.names}
    placements = {name: geometry.placements[geometry.profile(name)] for name in geometry.names}
    ends: list[tuple[float, int, int]] = []  # (end time, gpu, mask)
    outcome = Outcome()
    started = time.perf_counter()
    for request in requests:
        while ends and ends[0][0] <= request.time:
            _, gpu, mask = heapq.heappop(ends)
            states[gpu] &= ~mask
        large = request.profile in LARGE
        outcome.large_total += large
        choice = policy([(geometry, state) for state in states], request.profile)
        if choice is None:
            if strict and any(
                state & mask == 0 for state in states for mask in masks[request.profile]
            ):
                raise AssertionError(f"refused {request.profile} that had a legal free placement")
            continue
        mask = masks[request.profile][placements[request.profile].index(choice.placement)]
        assert states[choice.gpu] & mask == 0, "overlapping placement"
        states[choice.gpu] = choice.state
        heapq.heappush(ends, (request.time + request.lifetime, choice.gpu, mask))
        outcome.satisfied += 1
        outcome.large_satisfied += large
    outcome.seconds = time.perf_counter() - started
    return outcome


def main() -> None:
    """Replay the stream through both policies and print the shares."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=16)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--load", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    requests = stream(args.requests, args.gpus, args.load, args.seed)
    print(
        f"{args.requests} MIG requests on {args.gpus} H200 GPUs, offered load "
        f"{args.load:.0%}, seed {args.seed}"
    )
    results = {}
    for name, policy, strict in (("broker", choose_mig, True), ("first-fit", first_fit, False)):
        outcome = replay(requests, args.gpus, policy, strict=strict)
        results[name] = outcome
        print(
            f"{name:>9}: satisfied {outcome.satisfied / len(requests):.4f} of all, "
            f"{outcome.large_satisfied / max(outcome.large_total, 1):.4f} of large "
            f"({outcome.large_total} large requests), {outcome.seconds:.1f} s"
        )
    broker, baseline = results["broker"], results["first-fit"]
    large_ratio = (broker.large_satisfied / max(broker.large_total, 1)) / max(
        baseline.large_satisfied / max(baseline.large_total, 1), 1e-9
    )
    overall_delta = (broker.satisfied - baseline.satisfied) / len(requests)
    print(f"RESULT large_ratio={large_ratio:.3f} overall_delta={overall_delta:.4f}")


if __name__ == "__main__":
    main()
