"""The gateway's committed Proxmox schema, loaded once for the rucher.pve unit tests."""

from __future__ import annotations

import functools
from pathlib import Path

from rucher.pve.schema import ApiSchema, load_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "services" / "gateway" / "rucher" / "gateway" / "pve_schema.json"
APIDATA = ROOT.parent / "shared" / "fixtures" / "pve-api" / "apidata.js"


@functools.cache
def schema() -> ApiSchema:
    """The document ops/gen-pve-schema wrote."""
    return load_schema(SCHEMA_FILE.read_bytes())
