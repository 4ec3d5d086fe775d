"""The GPU broker's settings, read once from the environment."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rucher.gpu.pciids import find_pci_ids
from rucher.service import Settings, SettingsError, env_number

NVML_MODES = ("auto", "off")


@dataclass(frozen=True)
class GpuSettings:
    """What the broker reads beyond every service's ``RUCHER_*`` settings."""

    base: Settings
    sysfs_root: Path
    nvml: str
    discovery_interval: float
    release_grace: float
    pci_ids: Path | None

    @classmethod
    def from_env(cls, base: Settings, environ: Mapping[str, str] = os.environ) -> GpuSettings:
        """Read the settings, naming the variable at fault when one is wrong."""
        number = functools.partial(env_number, environ)

        root = Path(environ.get("RUCHER_GPU_SYSFS_ROOT", "") or "/sys")
        if not root.is_dir():
            raise SettingsError(f"RUCHER_GPU_SYSFS_ROOT={str(root)!r} is not a folder")
        nvml = environ.get("RUCHER_GPU_NVML", "") or "auto"
        if nvml not in NVML_MODES:
            raise SettingsError(f"RUCHER_GPU_NVML={nvml!r}: use one of {', '.join(NVML_MODES)}")
        ids = environ.get("RUCHER_GPU_PCI_IDS", "")
        pci_ids = Path(ids) if ids else find_pci_ids()
        if pci_ids is not None and not pci_ids.is_file():
            raise SettingsError(f"RUCHER_GPU_PCI_IDS={ids!r} is not a file")
        return cls(
            base=base,
            sysfs_root=root,
            nvml=nvml,
            discovery_interval=number("RUCHER_GPU_DISCOVERY_INTERVAL", 30.0, 0.1),
            release_grace=number("RUCHER_GPU_RELEASE_GRACE", 60.0, 0.0),
            pci_ids=pci_ids,
        )
