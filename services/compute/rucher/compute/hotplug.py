"""Hot-plug of new disks and NICs into a running guest, as Proxmox's ``hotplug`` option allows.

A new SCSI or VirtIO disk, or a new NIC, that a running guest gets in a config change is attached
at once when the guest's ``hotplug`` option names ``disk`` or ``network`` (Proxmox's default is
``network,disk,usb``); it then leaves the pending section for the config. Whatever QEMU refuses,
and every other change, stays pending for the next start ("hotplug problem" in the task log).
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from rucher.bus import RucherError
from rucher.compute import admission
from rucher.compute.domain_xml import NET_KEY, domain_name
from rucher.proto.guest import GuestRecord

if TYPE_CHECKING:
    from rucher.compute.ports import TaskLog
    from rucher.compute.service import ComputeService

DEFAULT = "network,disk,usb"
# Disk buses QEMU hot-plugs (IDE and SATA drives cannot be added to a running machine).
HOT_DISK = re.compile(r"^(scsi|virtio)\d+$")


def kinds(config: Mapping[str, str]) -> set[str]:
    """What the ``hotplug`` option allows: ``1`` is the default set, ``0`` nothing."""
    value = config.get("hotplug", DEFAULT).strip()
    if value == "0":
        return set()
    if value == "1":
        value = DEFAULT
    return {part for part in value.split(",") if part}


def candidates(record: GuestRecord) -> list[str]:
    """Pending keys that add a device the guest may get at once."""
    allowed = kinds(record.config)
    found: list[str] = []
    for key in sorted(record.pending):
        if key in record.config or key in record.pending_delete:
            continue
        if (HOT_DISK.match(key) and "disk" in allowed) or (
            NET_KEY.match(key) and "network" in allowed
        ):
            found.append(key)
    return found


def device_xml(domain: str, key: str) -> str | None:
    """The device element of config key ``key`` in a rendered domain, without boot order."""
    for device in ET.fromstring(domain).iter():  # noqa: S314 - rendered here, from our config
        alias = device.find("alias")
        if alias is None or alias.get("name") != f"ua-{key}":
            continue
        for boot in device.findall("boot"):
            device.remove(boot)
        return ET.tostring(device, encoding="unicode")
    return None


async def plug_pending(service: ComputeService, record: GuestRecord, task: TaskLog) -> GuestRecord:
    """Attach what may be hot-plugged; the keys attached move from pending to the config."""
    keys = candidates(record)
    if not keys:
        return record
    target = {**record.config, **{key: record.pending[key] for key in keys}}
    try:
        volumes = await service.map_volumes(target)
        domain = admission.render(record.vmid, target, service.facts, volumes)
    except RucherError as err:
        await task.log(f"hotplug problem - {err.message}")
        return record
    plugged: list[str] = []
    for key in keys:
        device = device_xml(domain, key)
        if device is None:
            continue
        try:
            await service.hypervisor.attach_device(domain_name(record.vmid), device)
        except RucherError as err:
            await task.log(f"hotplug problem - {key}: {err.message}")
            continue
        await task.log(f"{key}: hot-plugged")
        plugged.append(key)
    if not plugged:
        return record
    return await service.guests.rewrite(
        record.vmid, functools.partial(_applied, plugged), lock_held=record.lock
    )


def _applied(keys: list[str], record: GuestRecord) -> GuestRecord:
    present = [key for key in keys if key in record.pending]
    return msgspec.structs.replace(
        record,
        config={**record.config, **{key: record.pending[key] for key in present}},
        pending={k: v for k, v in record.pending.items() if k not in present},
    )
