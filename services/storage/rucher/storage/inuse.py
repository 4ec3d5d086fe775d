"""Which guests have a volume attached: the volume ids a guest's configuration names.

A VM's disks and CD-ROMs (``scsi0``, ``ide2``, ``efidisk0``...) and a container's ``rootfs`` and
mount points (``mp0``) name their volume first (``local:100/vm-100-disk-0.qcow2,size=4G``) or as
``file=`` / ``volume=``. ``unusedN`` entries are detached disks: no running guest uses them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode

_ATTACHED = re.compile(r"^(?:(?:ide|sata|scsi|virtio|efidisk|tpmstate|mp)\d+|rootfs)$")
_NAMED = ("file", "volume")


def attached_volumes(config: Mapping[str, str]) -> set[str]:
    """The volume ids ``config`` attaches (``STORAGE:NAME``; paths and ``none`` are not volumes)."""
    found: set[str] = set()
    for key, value in config.items():
        if not _ATTACHED.match(key):
            continue
        items = value.split(",")
        candidates = [items[0]] if "=" not in items[0] else []
        candidates += [item.split("=", 1)[1] for item in items if item.split("=", 1)[0] in _NAMED]
        found.update(c for c in candidates if ":" in c and not c.startswith("/"))
    return found


def in_use(volid: str, vmids: list[int]) -> RucherError:
    """The refusal of a change to a volume that running guests have attached."""
    guests = ", ".join(str(vmid) for vmid in sorted(vmids))
    noun = "guest" if len(vmids) == 1 else "guests"
    return RucherError(
        ErrorCode.INVALID,
        f"volume '{volid}' is in use by running {noun} {guests}: stop it first",
        details={"field": "volid", "vmids": sorted(vmids)},
    )
