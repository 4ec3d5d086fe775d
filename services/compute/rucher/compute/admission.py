"""Check a guest config against the schema and this node before anything is created."""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from rucher.bus import RucherError
from rucher.compute import gpu
from rucher.compute.disks import UNUSED_KEY, VOLUME_ID
from rucher.compute.domain_xml import (
    DISK_KEY,
    NET_KEY,
    DomainConfigError,
    DomainSpec,
    HostFacts,
    domain_xml,
    parse_disk,
    parse_net,
)
from rucher.compute.drivers.interface import NodeFacts
from rucher.proto.errors import ErrorCode

# What a storage disk's element is while a config is only checked, before anything is mapped.
STAND_IN = "<disk type='file'><source file='/dev/null'/></disk>"
PROXMOX_OUI = "BC:24:11"
NET_MODEL_KEYS = ("model", "macaddr")


def invalid(field: str, message: str) -> RucherError:
    """A bad parameter, naming it the way Proxmox's ``errors`` object does."""
    return RucherError(ErrorCode.INVALID, message, details={"field": field})


def disk_elements(
    config: Mapping[str, str], volumes: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``<disk>`` elements: host paths here, storage volumes from ``volumes`` (mapped by key).

    Without ``volumes`` the config is only being checked: a storage disk (``STORAGE:SIZE`` or a
    volume id) gets a stand-in element so the rest of its options are still checked.
    """
    mapped: dict[str, str] = {}
    for key in (key for key in config if DISK_KEY.match(key)):
        options = _disk_options(key, config[key])
        path = str(options["file"])
        if options.get("media") == "cdrom" and path in {"none", "cdrom"}:
            continue
        if path.startswith("/"):
            kind = "block" if path.startswith("/dev/") else "file"
            disk = ET.Element("disk", type=kind)
            ET.SubElement(disk, "source", {"dev" if kind == "block" else "file": path})
            mapped[key] = ET.tostring(disk, encoding="unicode")
            continue
        if not VOLUME_ID.match(path):
            raise invalid(key, f"{key}: unable to parse volume ID '{path}'")
        if volumes is None:
            mapped[key] = STAND_IN
        elif key in volumes:
            mapped[key] = volumes[key]
    return mapped


def _disk_options(key: str, value: str) -> dict[str, Any]:
    try:
        return parse_disk(value, key)
    except DomainConfigError as err:
        raise invalid(err.field, err.message) from err


def render(
    vmid: int,
    config: Mapping[str, str],
    facts: HostFacts,
    volumes: Mapping[str, str] | None = None,
    hostdevs: Mapping[str, str] | None = None,
) -> str:
    """The domain XML of ``config``, or ``invalid`` naming the first key at fault.

    ``volumes`` are the mapped storage disks by key; without them the config is only checked.
    ``hostdevs`` are the ``<hostdev>`` elements the GPU broker leased, by ``hostpciN`` key.
    """
    domain_config = {key: value for key, value in config.items() if not _bookkeeping(key)}
    disks = disk_elements(domain_config, volumes)
    gpu.requests(domain_config)
    spec = DomainSpec(vmid=vmid, config=domain_config, disks=disks, hostdevs=hostdevs or {})
    try:
        return domain_xml(spec, facts)
    except DomainConfigError as err:
        raise invalid(err.field, f"{err.field}: {err.message}") from err


def _bookkeeping(key: str) -> bool:
    """Keys for the agent, not the domain: snapshots, detached volumes, hot-plug, saved state."""
    return key in {"parent", "hotplug", "vmstate"} or UNUSED_KEY.match(key) is not None


def check_node(config: Mapping[str, str], node: NodeFacts, bridges: frozenset[str]) -> None:
    """Refuse what this node cannot give: more vCPUs or memory than it has, unknown bridges."""
    vcpus = int(config.get("sockets", "1") or 1) * int(config.get("cores", "1") or 1)
    if vcpus > node.cpus:
        raise invalid("cores", f"MAX {node.cpus} vcpus allowed per VM on this node")
    raw_memory = config.get("memory", "512") or "512"
    memory = int(raw_memory.split(",")[0].removeprefix("current="))
    if memory << 20 > node.memory_total:
        total = node.memory_total >> 20
        raise invalid("memory", f"memory {memory} MiB is more than this node has ({total} MiB)")
    for key in (key for key in config if NET_KEY.match(key)):
        bridge = parse_net(config[key], key).get("bridge")
        if bridge is not None and str(bridge) not in bridges:
            raise invalid(key, f"bridge '{bridge}' does not exist")


def with_macs(config: Mapping[str, str]) -> dict[str, str]:
    """The config with a MAC address on every NIC that has none, as Proxmox stores it."""
    result = dict(config)
    for key in (key for key in config if NET_KEY.match(key)):
        options = parse_net(config[key], key)
        if "macaddr" in options:
            continue
        mac = ":".join([PROXMOX_OUI, *(f"{byte:02X}" for byte in secrets.token_bytes(3))])
        rest = "".join(
            f",{name}={_text(value)}"
            for name, value in options.items()
            if name not in NET_MODEL_KEYS
        )
        result[key] = f"{options.get('model', 'virtio')}={mac}{rest}"
    return result


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
