"""The scheduler's settings, read once from the environment."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from rucher.placement import Options
from rucher.proto.scheduler import CrsMode, PlacementPolicy, PlacementStrategy
from rucher.service import Settings, SettingsError, env_number


@dataclass(frozen=True)
class SchedulerSettings:
    """What the scheduler reads beyond every service's ``RUCHER_*`` settings."""

    base: Settings
    cpu_overcommit: float
    policy: PlacementPolicy
    options: Options
    agents: frozenset[str]
    sweep: float
    claim_grace: float
    attempts: int

    @classmethod
    def from_env(cls, base: Settings, environ: Mapping[str, str] = os.environ) -> SchedulerSettings:
        """Read the settings, naming the variable at fault when one is wrong."""
        number = functools.partial(env_number, environ)

        def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
            raw = environ.get(name, "") or default
            if raw not in allowed:
                raise SettingsError(f"{name}={raw!r}: use one of {', '.join(allowed)}")
            return raw

        strategy = choice("RUCHER_SCHEDULER_STRATEGY", "spread", tuple(PlacementStrategy))
        crs = choice("RUCHER_SCHEDULER_CRS", "none", ("none", *CrsMode))
        agents = environ.get("RUCHER_SCHEDULER_AGENTS", "compute,container")
        return cls(
            base=base,
            cpu_overcommit=number("RUCHER_SCHEDULER_CPU_OVERCOMMIT", 2.0, 0.1),
            policy=PlacementPolicy(
                strategy=PlacementStrategy(strategy),
                crs=None if crs == "none" else CrsMode(crs),
            ),
            options=Options(
                window=int(number("RUCHER_SCHEDULER_WINDOW", 1024, 16)),
                enough=int(number("RUCHER_SCHEDULER_ENOUGH", 64, 1)),
            ),
            agents=frozenset(a.strip() for a in agents.split(",") if a.strip()),
            sweep=number("RUCHER_SCHEDULER_SWEEP", 1.0, 0.1),
            claim_grace=number("RUCHER_SCHEDULER_CLAIM_GRACE", 2.0, 0.0),
            attempts=int(number("RUCHER_SCHEDULER_ATTEMPTS", 16, 1)),
        )
