"""Vendor and device names from the PCI ID database (``pci.ids``), as ``lspci`` shows them.

Only the names of the ids present on the node are kept: the file (about 1.3 MB) is read again
only when a device with ids not seen before appears.
"""

from __future__ import annotations

from pathlib import Path

KNOWN_PLACES = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


def find_pci_ids() -> Path | None:
    """Where the distribution keeps the database, if it is installed."""
    return next((path for path in KNOWN_PLACES if path.is_file()), None)


def read_names(
    path: Path, ids: set[tuple[str, str]]
) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """Vendor names and (vendor, device) names for ``ids`` (lower-case hex)."""
    vendors: dict[str, str] = {}
    devices: dict[tuple[str, str], str] = {}
    wanted_vendors = {vendor for vendor, _ in ids}
    vendor: str | None = None
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith("C "):
                break  # the device classes follow the vendors
            if not line.strip() or line.startswith("#"):
                continue
            if not line.startswith("\t"):
                code, _, name = line.partition("  ")
                vendor = code.lower() if code.lower() in wanted_vendors else None
                if vendor is not None:
                    vendors[vendor] = name.strip()
            elif vendor is not None and not line.startswith("\t\t"):
                code, _, name = line.strip().partition("  ")
                if (vendor, code.lower()) in ids:
                    devices[(vendor, code.lower())] = name.strip()
    return vendors, devices


class PciNames:
    """Names of the node's PCI ids, read once per new set of ids."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.seen: set[tuple[str, str]] = set()
        self.vendors: dict[str, str] = {}
        self.devices: dict[tuple[str, str], str] = {}

    def names(self, vendor: str, device: str) -> tuple[str, str]:
        """(vendor name, device name); empty strings when unknown."""
        return self.vendors.get(vendor, ""), self.devices.get((vendor, device), "")

    def learn(self, ids: set[tuple[str, str]]) -> None:
        """Make sure the names of ``ids`` are loaded."""
        if self.path is None or ids <= self.seen:
            return
        self.seen |= ids
        self.vendors, self.devices = read_names(self.path, self.seen)
