"""Write the Proxmox property-string formats the compute agent parses into its package.

Run: .venv/bin/python ops/gen_compute_formats.py [--check]

The gateway's schema document (``ops/gen_pve_schema.py``) already extracts ``qemu-net``,
``qemu-scsi`` and ``pve-qm-hostpci`` from Proxmox's ``apidata.js``; the agent cannot import the
gateway, so the same definitions, built by the same code, are written to
``services/compute/rucher/compute/pve_formats.json``. ``--check`` exits 1 when that file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_pve_schema import APIDATA, ROOT, build

OUTPUT = ROOT / "services" / "compute" / "rucher" / "compute" / "pve_formats.json"
FORMATS = ("qemu-net", "qemu-scsi", "pve-qm-hostpci")


def render(apidata: Path) -> str:
    """The formats document, stable and diff-friendly."""
    formats = build(apidata)["formats"]
    document = {name: formats[name] for name in FORMATS}
    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    """Write or check the formats file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apidata", type=Path, default=APIDATA)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render(args.apidata)
    if args.check:
        return 0 if OUTPUT.exists() and OUTPUT.read_text() == text else 1
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
