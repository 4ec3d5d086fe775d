"""The live manager's and LRMs' settings: round cadence, fence delay, CRS, shutdown policy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from rucher.ha.model import ClusterSettings
from rucher.service import SettingsError, env_number

CRS_MODES = ("basic", "static", "dynamic")
SHUTDOWN_POLICIES = ("conditional", "freeze", "failover", "migrate")


@dataclass(frozen=True)
class LiveSettings:
    """How often rounds run and the datacenter settings the manager applies.

    ``fence_delay`` defaults to 0: Proxmox waits 60 s before fencing a node that left the
    quorate partition, but here a node counts as gone only once its lease expired, which already
    proves its watchdog stopped its HA guests.
    """

    round_interval: float = 1.0
    min_gap: float = 0.1
    fence_delay: float = 0.0
    crs_mode: str = "basic"
    shutdown_policy: str = "conditional"
    rebalance_on_start: bool = False
    shutdown_timeout: float = 8.0

    def __post_init__(self) -> None:
        if self.crs_mode not in CRS_MODES:
            raise SettingsError(f"RUCHER_HA_CRS_MODE={self.crs_mode!r}: use basic|static|dynamic")
        if self.shutdown_policy not in SHUTDOWN_POLICIES:
            raise SettingsError(
                f"RUCHER_HA_SHUTDOWN_POLICY={self.shutdown_policy!r}: "
                "use conditional|freeze|failover|migrate"
            )
        if self.min_gap > self.round_interval:
            raise SettingsError("RUCHER_HA_MIN_GAP must not exceed RUCHER_HA_ROUND_INTERVAL")

    @property
    def cluster(self) -> ClusterSettings:
        """The datacenter settings as the core reads them."""
        return ClusterSettings(
            shutdown_policy=self.shutdown_policy,
            crs_mode=self.crs_mode,
            rebalance_on_start=self.rebalance_on_start,
            fence_delay=self.fence_delay,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> LiveSettings:
        """Read ``RUCHER_HA_ROUND_INTERVAL`` and the others, naming the one at fault."""
        return cls(
            round_interval=env_number(environ, "RUCHER_HA_ROUND_INTERVAL", 1.0, 0.05),
            min_gap=env_number(environ, "RUCHER_HA_MIN_GAP", 0.1, 0.0),
            fence_delay=env_number(environ, "RUCHER_HA_FENCE_DELAY", 0.0, 0.0),
            crs_mode=environ.get("RUCHER_HA_CRS_MODE", "") or "basic",
            shutdown_policy=environ.get("RUCHER_HA_SHUTDOWN_POLICY", "") or "conditional",
            rebalance_on_start=environ.get("RUCHER_HA_REBALANCE_ON_START", "") in ("1", "true"),
            shutdown_timeout=env_number(environ, "RUCHER_HA_SHUTDOWN_TIMEOUT", 8.0, 0.0),
        )
