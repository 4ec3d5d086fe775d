"""Proxmox guest config -> libvirt domain XML: a pure function, golden-tested.

Property strings are parsed with the formats Proxmox's own schema defines (``pve_formats.json``,
written by ``ops/gen_compute_formats.py``). Disks arrive already mapped by the storage service as
``<disk>`` elements without ``<target>``; this module adds the target, bus and boot order.
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

from rucher.compute.cloudinit import (
    CLOUDINIT_VOLUME,
    CloudInitError,
    cloudinit_drive,
    is_cloudinit_key,
    seed_files,
)
from rucher.pve.propstring import Format, parse
from rucher.pve.schema import Param
from rucher.pve.values import InvalidValueError

NAMESPACE = "https://rucher.dev/xmlns/guest/1"
UUID_NAMESPACE = uuid.UUID("1b0a5f4e-6a43-4d0e-9f5e-8c2f3c7d9a10")
DOMAIN_PREFIX = "rucher-"
DEFAULT_MEMORY_MIB = 512

DISK_KEY = re.compile(r"^(ide|sata|scsi|virtio)(\d+)$")
NET_KEY = re.compile(r"^net(\d+)$")
HOSTPCI_KEY = re.compile(r"^hostpci([0-9]|1[0-5])$")
# Keys that only Rucher's control plane reads: they change nothing in the domain definition.
META_KEYS = frozenset(
    {"name", "onboot", "startup", "tags", "protection", "template", "lock", "digest", "smbios1",
     "vmgenid", "ostype", "description", "hookscript", "meta", "arch"}
)  # fmt: skip
BUS_PREFIX = {"ide": "hd", "sata": "sd", "scsi": "sd", "virtio": "vd"}
BUS_OFFSET = {"ide": 0, "sata": 31, "scsi": 0, "virtio": 0}  # sata after scsi0-30: unique names
SCSI_MODELS = {
    "lsi": "lsilogic",
    "lsi53c810": "lsilogic",
    "megasas": "megasas",
    "pvscsi": "vmpvscsi",
    "virtio-scsi-pci": "virtio-scsi",
    "virtio-scsi-single": "virtio-scsi",
}
VGA_MODELS = {"std": "vga", "cirrus": "cirrus", "vmware": "vmvga", "qxl": "qxl", "virtio": "virtio"}
NET_MODELS = {"e1000-82540em": "e1000", "e1000-82544gc": "e1000", "e1000-82545em": "e1000"}
BOOT_LETTERS = {"c": "hd", "d": "cdrom", "n": "network"}
# The CPU model of a guest emulated by TCG, by architecture (Proxmox's aarch64 default).
EMULATED_CPU = {"x86_64": "qemu64", "aarch64": "cortex-a57"}


class DomainConfigError(ValueError):
    """A config value that cannot become a domain definition; ``field`` names the key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class HostFacts:
    """What the domain depends on beyond the config: the accelerator and where files go."""

    kvm: bool = False
    arch: str = "x86_64"
    console_dir: str = "/var/log/rucher/console"
    cloudinit_dir: str = "/var/lib/rucher/cloudinit"


@dataclass(frozen=True)
class DomainSpec:
    """Everything :func:`domain_xml` translates: the guest's id, config and mapped disks."""

    vmid: int
    config: Mapping[str, str]
    disks: Mapping[str, str] = field(default_factory=dict)
    hostdevs: Mapping[str, str] = field(default_factory=dict)


@cache
def formats() -> dict[str, Format]:
    """The property-string formats of Proxmox's schema that guest configs use."""
    text = resources.files("rucher.compute").joinpath("pve_formats.json").read_text()
    raw = json.loads(text)
    return {
        name: {key: Param(**_param_args(value)) for key, value in fmt.items()}
        for name, fmt in raw.items()
    }


def _param_args(value: dict[str, Any]) -> dict[str, Any]:
    renames = {"keyAlias": "key_alias", "minLength": "min_length", "maxLength": "max_length"}
    allowed = set(Param.__struct_fields__)
    args = {renames.get(key, key): item for key, item in value.items()}
    for flag in ("optional", "default_key"):
        if flag in args:
            args[flag] = bool(args[flag])
    return {key: item for key, item in args.items() if key in allowed}


def domain_name(vmid: int) -> str:
    """The libvirt name of guest ``vmid``; reconciliation recognises Rucher's domains by it."""
    return f"{DOMAIN_PREFIX}{vmid}"


def vmid_of(name: str) -> int | None:
    """The VMID a libvirt domain name stands for, or None for a domain Rucher did not name."""
    if name.startswith(DOMAIN_PREFIX) and name[len(DOMAIN_PREFIX) :].isdigit():
        return int(name[len(DOMAIN_PREFIX) :])
    return None


def parse_net(value: str, key: str = "net0") -> dict[str, Any]:
    """A ``netN`` value as a dict (``model``, ``macaddr``, ``bridge``...); raises naming ``key``."""
    return _parse(key, value, "qemu-net")


def parse_disk(value: str, key: str = "scsi0") -> dict[str, Any]:
    """A disk value (``scsiN``, ``virtioN``...) as a dict with ``file`` first."""
    return _parse(key, value, "qemu-scsi")


def parse_hostpci(value: str, key: str = "hostpci0") -> dict[str, Any]:
    """A ``hostpciN`` value as a dict (``host``, ``mapping``, ``mdev``, ``rombar``...)."""
    return _parse(key, value, "pve-qm-hostpci")


def _hostdev(devices: ET.Element, key: str, value: str, leased: str | None) -> None:
    """The ``<hostdev>`` elements the GPU broker leased for ``key`` (none while only checked)."""
    options = parse_hostpci(value, key)
    if leased is None:
        return
    for element in ET.fromstring(f"<leased>{leased}</leased>"):  # noqa: S314 - the broker's
        if options.get("rombar") is False or "romfile" in options:
            rom = _sub(element, "rom")
            if options.get("rombar") is False:
                rom.set("bar", "off")
            if "romfile" in options:
                rom.set("file", f"/usr/share/kvm/{options['romfile']}")
        devices.append(element)


def _parse(key: str, value: str, fmt: str) -> dict[str, Any]:
    try:
        return parse(value, formats()[fmt])
    except InvalidValueError as err:
        raise DomainConfigError(key, str(err)) from err


def _int(config: Mapping[str, str], key: str, default: int, minimum: int = 0) -> int:
    raw = config.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise DomainConfigError(key, f"type check ('integer') failed - got '{raw}'") from err
    if value < minimum:
        raise DomainConfigError(key, f"value must have a minimum value of {minimum}")
    return value


def _flag(config: Mapping[str, Any], key: str) -> bool:
    return str(config.get(key, "0")).lower() in {"1", "true", "on", "yes"}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def _memory(domain: ET.Element, config: Mapping[str, str]) -> int:
    memory = _memory_mib(config)
    balloon = _int(config, "balloon", memory)
    if balloon > memory:
        raise DomainConfigError("balloon", "balloon must not exceed memory")
    _sub(domain, "memory", str(memory), unit="MiB")
    _sub(domain, "currentMemory", str(balloon or memory), unit="MiB")
    return memory


def _memory_mib(config: Mapping[str, str]) -> int:
    raw = config.get("memory", str(DEFAULT_MEMORY_MIB))
    current = raw.split(",")[0].removeprefix("current=")  # PVE 8: memory=[current=]<MiB>
    return _int({"memory": current}, "memory", DEFAULT_MEMORY_MIB, minimum=16)


def _cpu(domain: ET.Element, config: Mapping[str, str], facts: HostFacts, memory: int) -> None:
    sockets = _int(config, "sockets", 1, minimum=1)
    cores = _int(config, "cores", 1, minimum=1)
    total = sockets * cores
    vcpus = _int(config, "vcpus", total, minimum=1)
    if vcpus > total:
        raise DomainConfigError("vcpus", f"maximum is sockets * cores = {total}")
    _sub(domain, "vcpu", str(total), placement="static", current=str(vcpus))
    cputype = config.get("cpu", "").split(",")[0].removeprefix("cputype=") or "default"
    if not facts.kvm:
        cpu = _sub(domain, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", EMULATED_CPU[facts.arch], fallback="forbid")
    elif cputype == "host":
        cpu = _sub(domain, "cpu", mode="host-passthrough", check="none")
    elif cputype in {"kvm64", "qemu64", "kvm32", "qemu32"}:
        cpu = _sub(domain, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", cputype, fallback="allow")
    else:
        cpu = _sub(domain, "cpu", mode="host-model", check="partial")
    _sub(cpu, "topology", sockets=str(sockets), dies="1", cores=str(cores), threads="1")
    if _flag(config, "numa"):
        numa = _sub(cpu, "numa")
        per_socket = memory // sockets
        for socket in range(sockets):
            first = socket * cores
            cpus = f"{first}-{first + cores - 1}" if cores > 1 else str(first)
            _sub(numa, "cell", id=str(socket), cpus=cpus, memory=str(per_socket), unit="MiB")


def _kernel_args(config: Mapping[str, str]) -> dict[str, str]:
    """Direct kernel boot from Proxmox's ``args`` (only ``-kernel``/``-initrd``/``-append``)."""
    raw = config.get("args")
    if not raw:
        return {}
    words = shlex.split(raw)
    flags = {"-kernel": "kernel", "-initrd": "initrd", "-append": "cmdline"}
    found: dict[str, str] = {}
    if len(words) % 2:
        raise DomainConfigError("args", "each option needs a value")
    for flag, value in zip(words[::2], words[1::2], strict=True):
        if flag not in flags:
            raise DomainConfigError(
                "args", f"only -kernel, -initrd and -append are supported: {flag}"
            )
        found[flags[flag]] = value
    return found


def _os(domain: ET.Element, config: Mapping[str, str], facts: HostFacts) -> list[str]:
    default = "virt" if facts.arch == "aarch64" else "pc"
    machine = config.get("machine", default).split(",")[0].removeprefix("type=").split("+")[0]
    if not re.fullmatch(r"(pc|q35|virt)(-[a-z0-9.-]+)?", machine):
        raise DomainConfigError("machine", f"unknown machine type '{machine}'")
    bios = config.get("bios", "seabios")
    if bios not in {"seabios", "ovmf"}:
        raise DomainConfigError("bios", f"value '{bios}' does not have a value in the enumeration")
    os_element = _sub(domain, "os", firmware="efi") if bios == "ovmf" else _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch=facts.arch, machine=machine)
    kernel = _kernel_args(config)
    for tag, value in kernel.items():
        _sub(os_element, tag, value)
    order = config.get("boot", "")
    if kernel:
        # Direct kernel boot: a boot order on disks would make the firmware try them first
        # (an empty disk delays the kernel by tens of seconds under TCG).
        return []
    if order.startswith("order="):
        return [device for device in order.removeprefix("order=").split(";") if device]
    if order:
        if not set(order) <= set(BOOT_LETTERS):
            raise DomainConfigError("boot", f"invalid boot order '{order}'")
        for letter in order:
            _sub(os_element, "boot", dev=BOOT_LETTERS[letter])
    return []


def _features(domain: ET.Element, config: Mapping[str, str], facts: HostFacts) -> None:
    features = _sub(domain, "features")
    if facts.arch == "x86_64":  # aarch64's virt machine: no ACPI without UEFI, a GIC not APIC
        _sub(features, "acpi")  # without it a guest's poweroff or ACPI shutdown only halts it
        _sub(features, "apic")
    windows = config.get("ostype", "").startswith("w")
    if windows:
        hyperv = _sub(features, "hyperv", mode="custom")
        _sub(hyperv, "relaxed", state="on")
        _sub(hyperv, "vapic", state="on")
        _sub(hyperv, "spinlocks", state="on", retries="8191")
    _sub(domain, "clock", offset="localtime" if windows else "utc")


def _disk_target(key: str) -> tuple[str, str]:
    match = DISK_KEY.match(key)
    if match is None:
        raise DomainConfigError(key, "not a disk key")
    bus, index = match.group(1), int(match.group(2)) + BUS_OFFSET[match.group(1)]
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return BUS_PREFIX[bus] + letters, bus


def seed_path(vmid: int, facts: HostFacts) -> str:
    """Where the cloud-init seed image of guest ``vmid`` lives on this host."""
    return f"{facts.cloudinit_dir}/{vmid}-cidata.iso"


def _disk(
    devices: ET.Element,
    key: str,
    value: str,
    mapped: str | None,
    boot: int | None,
    *,
    seed: str | None = None,
) -> None:
    options = parse_disk(value, key)
    dev, bus = _disk_target(key)
    if seed is not None and CLOUDINIT_VOLUME.match(str(options["file"])):
        options["media"] = "cdrom"  # Proxmox's cloud-init drive is always a CD-ROM
        disk = _sub(devices, "disk", type="file")
        _sub(disk, "driver", name="qemu", type="raw")
        _sub(disk, "source", file=seed)
    else:
        disk = _disk_element(devices, key, options, mapped)
    cdrom = options.get("media") == "cdrom"
    disk.set("device", "cdrom" if cdrom else "disk")
    driver = disk.find("driver")
    if driver is None:
        driver = _sub(disk, "driver", name="qemu", type="raw")
    for option, attribute in (("cache", "cache"), ("aio", "io")):
        if option in options:
            driver.set(attribute, str(options[option]))
    if options.get("discard") == "on":
        driver.set("discard", "unmap")
    if "detect_zeroes" in options:
        driver.set("detect_zeroes", "unmap" if options["detect_zeroes"] else "off")
    target = _sub(disk, "target", dev=dev, bus="sata" if bus == "sata" else bus)
    if _flag(options, "ssd") and not cdrom:
        target.set("rotation_rate", "1")
    _iotune(disk, options)
    if (cdrom or _flag(options, "ro")) and disk.find("readonly") is None:
        _sub(disk, "readonly")  # the storage service's element of an ISO already has one
    if "serial" in options:
        _sub(disk, "serial", str(options["serial"]))
    if boot is not None:
        _sub(disk, "boot", order=str(boot))
    _sub(disk, "alias", name=f"ua-{key}")


def _disk_element(
    devices: ET.Element, key: str, options: Mapping[str, Any], mapped: str | None
) -> ET.Element:
    if mapped is not None:
        try:
            # The storage service of this cluster wrote it: trusted, and without entities.
            disk = ET.fromstring(mapped)  # noqa: S314
        except ET.ParseError as err:
            message = f"storage returned an invalid disk element: {err}"
            raise DomainConfigError(key, message) from err
        devices.append(disk)
        return disk
    if options.get("media") == "cdrom" and options["file"] in {"none", "cdrom"}:
        return _sub(devices, "disk", type="file")
    raise DomainConfigError(key, f"volume '{options['file']}' is not mapped on this node")


def _iotune(disk: ET.Element, options: Mapping[str, Any]) -> None:
    limits = {
        "mbps": "total_bytes_sec", "mbps_rd": "read_bytes_sec", "mbps_wr": "write_bytes_sec",
        "iops": "total_iops_sec", "iops_rd": "read_iops_sec", "iops_wr": "write_iops_sec",
    }  # fmt: skip
    present = [(name, tag) for name, tag in limits.items() if name in options]
    if not present:
        return
    iotune = _sub(disk, "iotune")
    for name, tag in present:
        number = float(options[name])
        _sub(
            iotune, tag, str(int(number * 1024 * 1024) if name.startswith("mbps") else int(number))
        )


def _net(devices: ET.Element, key: str, value: str, boot: int | None) -> None:
    options = parse_net(value, key)
    bridge = options.get("bridge")
    interface = _sub(devices, "interface", type="bridge" if bridge else "user")
    if "macaddr" in options:
        _sub(interface, "mac", address=str(options["macaddr"]).lower())
    if bridge:
        _sub(interface, "source", bridge=str(bridge))
    if "tag" in options:
        vlan = _sub(interface, "vlan")
        _sub(vlan, "tag", id=str(options["tag"]))
    model = str(options.get("model", "virtio"))
    _sub(interface, "model", type=NET_MODELS.get(model, model))
    if "queues" in options and model == "virtio":
        _sub(interface, "driver", queues=str(options["queues"]))
    if "rate" in options:
        rate = str(int(float(options["rate"]) * 1024))  # MB/s in Proxmox, KiB/s in libvirt
        bandwidth = _sub(interface, "bandwidth")
        _sub(bandwidth, "inbound", average=rate)
        _sub(bandwidth, "outbound", average=rate)
    if "mtu" in options:
        _sub(interface, "mtu", size=str(options["mtu"]))
    if _flag(options, "link_down"):
        _sub(interface, "link", state="down")
    if boot is not None:
        _sub(interface, "boot", order=str(boot))
    _sub(interface, "alias", name=f"ua-{key}")


def _serial(devices: ET.Element, key: str, value: str, vmid: int, facts: HostFacts) -> None:
    port = key.removeprefix("serial")
    log = f"{facts.console_dir}/{vmid}-{key}.log"
    if value == "socket":
        serial = _sub(devices, "serial", type="pty")
    elif value.startswith("/dev/"):
        serial = _sub(devices, "serial", type="dev")
        _sub(serial, "source", path=value)
    else:
        raise DomainConfigError(key, f"value '{value}' is neither 'socket' nor a /dev/ path")
    if facts.arch == "aarch64":
        target = _sub(serial, "target", type="system-serial", port=port)
        _sub(target, "model", name="pl011")
    else:
        _sub(serial, "target", type="isa-serial", port=port)
    _sub(serial, "log", file=log, append="off")


def _display(devices: ET.Element, config: Mapping[str, str], facts: HostFacts) -> None:
    default = "virtio" if facts.arch == "aarch64" else "std"  # virt has no VGA card
    vga = config.get("vga", default).split(",")[0].removeprefix("type=")
    if vga == "none" or vga.startswith("serial"):
        _sub(_sub(devices, "video"), "model", type="none")
        return
    if vga not in VGA_MODELS:
        raise DomainConfigError("vga", f"value '{vga}' is not supported")
    _sub(devices, "graphics", type="vnc", autoport="yes", listen="127.0.0.1")
    _sub(_sub(devices, "video"), "model", type=VGA_MODELS[vga])


def _controllers(devices: ET.Element, config: Mapping[str, str], keys: list[str]) -> None:
    if any(key.startswith("scsi") for key in keys):
        scsihw = config.get("scsihw", "lsi")
        if scsihw not in SCSI_MODELS:
            raise DomainConfigError("scsihw", f"value '{scsihw}' is not supported")
        _sub(devices, "controller", type="scsi", index="0", model=SCSI_MODELS[scsihw])
    if _flag({"agent": config.get("agent", "0").split(",")[0].removeprefix("enabled=")}, "agent"):
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")


def _check_keys(config: Mapping[str, str]) -> None:
    handled = {
        "memory", "balloon", "sockets", "cores", "vcpus", "cpu", "numa", "machine", "bios",
        "boot", "scsihw", "vga", "agent", "args", "serial0", "serial1", "serial2", "serial3",
    }  # fmt: skip
    for key in config:
        if key in handled or key in META_KEYS or DISK_KEY.match(key) or NET_KEY.match(key):
            continue
        if HOSTPCI_KEY.match(key):
            continue
        if is_cloudinit_key(key):
            continue
        raise DomainConfigError(key, "not supported by this compute agent yet")


def _cloudinit(metadata: ET.Element, spec: DomainSpec, facts: HostFacts) -> str | None:
    """The seed's files in the domain's metadata (the driver builds the image from them)."""
    config = spec.config
    has_options = any(is_cloudinit_key(key) for key in config)
    drive = cloudinit_drive(config)
    if drive is None and not has_options:
        return None
    try:
        files = seed_files(spec.vmid, config)
    except CloudInitError as err:
        raise DomainConfigError(err.field, err.message) from err
    if drive is None:
        return None  # checked, but Proxmox writes no seed without a cloud-init drive
    path = seed_path(spec.vmid, facts)
    element = ET.SubElement(metadata, f"{{{NAMESPACE}}}cloudinit", image=path)
    for name, text in files.items():
        ET.SubElement(element, f"{{{NAMESPACE}}}file", name=name).text = text
    return path


def domain_uuid(vmid: int, config: Mapping[str, str]) -> str:
    """The guest's UUID: ``smbios1``'s ``uuid`` when set, else one derived from the VMID."""
    for part in config.get("smbios1", "").split(","):
        if part.startswith("uuid="):
            return str(uuid.UUID(part.removeprefix("uuid=")))
    return str(uuid.uuid5(UUID_NAMESPACE, str(vmid)))


def _guest_facts(config: Mapping[str, str], facts: HostFacts) -> HostFacts:
    """The facts with the guest's ``arch``: another architecture than the host's is emulated."""
    arch = config.get("arch", facts.arch)
    if arch not in EMULATED_CPU:
        allowed = ", ".join(sorted(EMULATED_CPU))
        raise DomainConfigError("arch", f"value '{arch}' is not one of {allowed}")
    ide = sorted(key for key in config if key.startswith("ide") and DISK_KEY.match(key))
    if arch == "aarch64" and ide:
        raise DomainConfigError(ide[0], "aarch64 guests (machine virt) have no IDE bus")
    if arch == facts.arch:
        return facts
    return replace(facts, arch=arch, kvm=False)


def domain_xml(spec: DomainSpec, facts: HostFacts) -> str:
    """The libvirt ``<domain>`` document for a guest's Proxmox config."""
    config = spec.config
    _check_keys(config)
    facts = _guest_facts(config, facts)
    domain = ET.Element("domain", type="kvm" if facts.kvm else "qemu")
    _sub(domain, "name", domain_name(spec.vmid))
    _sub(domain, "uuid", domain_uuid(spec.vmid, config))
    if "name" in config:
        _sub(domain, "title", config["name"])
    if "description" in config:
        _sub(domain, "description", config["description"])
    metadata = _sub(domain, "metadata")
    ET.SubElement(metadata, f"{{{NAMESPACE}}}guest", vmid=str(spec.vmid))
    seed = _cloudinit(metadata, spec, facts)
    memory = _memory(domain, config)
    _cpu(domain, config, facts, memory)
    order = _os(domain, config, facts)
    _features(domain, config, facts)
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    disks = sorted((key for key in config if DISK_KEY.match(key)), key=_device_sort)
    drive = cloudinit_drive(config)
    _controllers(devices, config, disks)
    for key in disks:
        boot = order.index(key) + 1 if key in order else None
        _disk(
            devices,
            key,
            config[key],
            spec.disks.get(key),
            boot,
            seed=seed if key == drive else None,
        )
    for key in sorted((key for key in config if NET_KEY.match(key)), key=_device_sort):
        _net(devices, key, config[key], order.index(key) + 1 if key in order else None)
    for key in sorted(key for key in config if key.startswith("serial")):
        _serial(devices, key, config[key], spec.vmid, facts)
    for key in sorted((key for key in config if HOSTPCI_KEY.match(key)), key=_device_sort):
        _hostdev(devices, key, config[key], spec.hostdevs.get(key))
    _display(devices, config, facts)
    balloon = _int(config, "balloon", 1)
    _sub(devices, "memballoon", model="virtio" if balloon else "none")
    ET.register_namespace("rucher", NAMESPACE)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _device_sort(key: str) -> tuple[str, int]:
    match = re.match(r"^([a-z]+)(\d+)$", key)
    return (match.group(1), int(match.group(2))) if match else (key, 0)
