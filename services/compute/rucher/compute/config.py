"""The compute agent's settings, read once from the environment."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rucher.service import Settings, env_number

DEFAULT_URI = "qemu:///system"


@dataclass(frozen=True)
class ComputeSettings:
    """What the compute agent reads beyond every service's ``RUCHER_*`` settings."""

    base: Settings
    libvirt_uri: str
    console_dir: Path
    shutdown_timeout: float
    capacity_interval: float
    rrd_interval: float = 20.0
    cloudinit_dir: Path = Path("/var/lib/rucher/cloudinit")
    # The address this node's libvirtd and QEMU take live migrations on (none: no live ones in).
    migration_address: str | None = None
    qemu_pid_dir: Path = Path("/run/libvirt/qemu")

    @classmethod
    def from_env(cls, base: Settings, environ: Mapping[str, str] = os.environ) -> ComputeSettings:
        """Read the settings, naming the variable at fault when one is wrong."""
        number = functools.partial(env_number, environ)

        console = environ.get("RUCHER_COMPUTE_CONSOLE_DIR") or str(base.state_dir / "console")
        return cls(
            base=base,
            libvirt_uri=environ.get("RUCHER_LIBVIRT_URI") or DEFAULT_URI,
            # libvirt's virtlogd opens the console logs: the folder must be absolute.
            console_dir=Path(console).absolute(),
            shutdown_timeout=number("RUCHER_COMPUTE_SHUTDOWN_TIMEOUT", 180.0),
            capacity_interval=number("RUCHER_COMPUTE_CAPACITY_INTERVAL", 30.0),
            rrd_interval=number("RUCHER_COMPUTE_RRD_INTERVAL", 20.0),
            cloudinit_dir=Path(
                environ.get("RUCHER_COMPUTE_CLOUDINIT_DIR") or str(base.state_dir / "cloudinit")
            ).absolute(),
            migration_address=environ.get("RUCHER_COMPUTE_MIGRATION_ADDRESS") or None,
            qemu_pid_dir=Path(environ.get("RUCHER_LIBVIRT_QEMU_PID_DIR") or "/run/libvirt/qemu"),
        )
