"""The real sysfs: attributes under a root folder (``/sys`` on a host, a tree in tests)."""

from __future__ import annotations

import os
from pathlib import Path


class HostSysfs:
    """Reads and writes files under ``root``; the kernel behind it does the rest."""

    def __init__(self, root: str | Path = "/sys") -> None:
        self.root = Path(root)

    def read(self, path: str) -> str | None:
        """An attribute's value without the trailing newline; None when it does not exist."""
        try:
            return (self.root / path).read_text().rstrip("\n")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            return None
        except OSError:
            return None  # attributes a device refuses to read (config space of a dead device)

    def write(self, path: str, value: str) -> None:
        """Write an attribute; the kernel's refusal comes back as ``OSError``."""
        with open(self.root / path, "w") as handle:
            handle.write(value)

    def listdir(self, path: str) -> list[str]:
        """The names in a directory, sorted; empty when it does not exist."""
        try:
            return sorted(os.listdir(self.root / path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def link(self, path: str) -> str | None:
        """The last component of a symbolic link's target."""
        try:
            return os.path.basename(os.readlink(self.root / path))
        except (FileNotFoundError, OSError):
            return None
