"""Cloud-init NoCloud seeds from Proxmox's ``ci*`` options: pure functions, golden-tested.

A guest whose config has a cloud-init drive (``ide2: local:cloudinit``, or Proxmox's stored
form ``local:vm-100-cloudinit,media=cdrom``) gets a seed image labelled ``cidata`` with
``meta-data``, ``user-data`` and ``network-config`` (version 1), the way Proxmox writes them for
``citype: nocloud``: ``ciuser``, ``cipassword``, ``sshkeys`` (URL-encoded, one key a line),
``ipconfigN`` (``ip=dhcp|CIDR,gw=IP,ip6=dhcp|auto|CIDR,gw6=IP`` for ``netN``), ``nameserver``
and ``searchdomain``. The seed's files ride in the domain definition (see ``domain_xml``), so the
driver rebuilds the image whenever the domain is defined from a changed config.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from urllib.parse import unquote

CLOUDINIT_VOLUME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*:(?:cloudinit|vm-\d+-cloudinit(?:\.\w+)?)$")
IPCONFIG_KEY = re.compile(r"^ipconfig(\d+)$")
CI_KEYS = frozenset(
    {"ciuser", "cipassword", "sshkeys", "nameserver", "searchdomain", "citype", "ciupgrade"}
)
SEED_FILES = ("meta-data", "user-data", "network-config")
KEY_TYPES = ("ssh-", "ecdsa-", "sk-")
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$")


class CloudInitError(ValueError):
    """A ``ci*`` value that cannot go into a seed; ``field`` names the key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def is_cloudinit_key(key: str) -> bool:
    """Whether ``key`` is one of the cloud-init options (``ciuser``, ``ipconfig0``...)."""
    return key in CI_KEYS or IPCONFIG_KEY.match(key) is not None


def drive_file(value: str) -> str:
    """The ``file`` part of a disk value."""
    return value.split(",", 1)[0].removeprefix("file=")


def cloudinit_drive(config: Mapping[str, str]) -> str | None:
    """The key of the config's cloud-init drive (``ide2``), or None."""
    for key in sorted(config):
        if re.match(r"^(ide|sata|scsi|virtio)\d+$", key) and CLOUDINIT_VOLUME.match(
            drive_file(config[key])
        ):
            return key
    return None


ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# The order SHA-512-crypt encodes the final digest's bytes in, three at a time.
SHA512_ORDER = [((i * 22) % 63, (i * 22 + 21) % 63, (i * 22 + 42) % 63) for i in range(21)]


def _b64(first: int, second: int, third: int, count: int) -> str:
    word = (first << 16) | (second << 8) | third
    out = ""
    for _ in range(count):
        out += ITOA64[word & 0x3F]
        word >>= 6
    return out


def sha512_crypt(password: str, salt: str, rounds: int = 5000) -> str:
    """``crypt(3)``'s SHA-512 scheme (``$6$``), which cloud-init's ``password`` accepts."""
    key, pepper = password.encode(), salt.encode()[:16]
    alternate = hashlib.sha512(key + pepper + key).digest()
    ctx = hashlib.sha512(key + pepper)
    length = len(key)
    while length > 64:
        ctx.update(alternate)
        length -= 64
    ctx.update(alternate[:length])
    length = len(key)
    while length:
        ctx.update(alternate if length & 1 else key)
        length >>= 1
    digest = ctx.digest()
    p_bytes = (hashlib.sha512(key * len(key)).digest() * (len(key) // 64 + 1))[: len(key)]
    s_digest = hashlib.sha512(pepper * (16 + digest[0])).digest()
    s_bytes = (s_digest * (len(pepper) // 64 + 1))[: len(pepper)]
    for index in range(rounds):
        step = hashlib.sha512(p_bytes if index & 1 else digest)
        if index % 3:
            step.update(s_bytes)
        if index % 7:
            step.update(p_bytes)
        step.update(digest if index & 1 else p_bytes)
        digest = step.digest()
    encoded = "".join(_b64(digest[a], digest[b], digest[c], 4) for a, b, c in SHA512_ORDER)
    encoded += _b64(0, 0, digest[63], 2)
    return f"$6${pepper.decode()}${encoded}"


def _password(vmid: int, password: str) -> str:
    """A plain ``cipassword`` hashed (a salt of its own per guest); a hash stays as it is."""
    if password.startswith("$"):
        return password
    seed = hashlib.sha256(f"rucher-cloudinit-{vmid}".encode()).digest()
    salt = "".join(ITOA64[byte & 0x3F] for byte in seed[:16])
    return sha512_crypt(password, salt)


def _yaml_string(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _sshkeys(raw: str) -> list[str]:
    keys = [line.strip() for line in unquote(raw).splitlines() if line.strip()]
    for key in keys:
        if not key.startswith(KEY_TYPES) or len(key.split()) < 2:
            raise CloudInitError("sshkeys", f"invalid SSH public key '{key[:40]}'")
    return keys


def _ipconfig(key: str, value: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in value.split(","):
        if not part:
            continue
        name, sep, text = part.partition("=")
        if not sep or name not in {"ip", "gw", "ip6", "gw6"}:
            raise CloudInitError(key, f"invalid format - unknown or malformed option '{part}'")
        options[name] = text
    for name, families in (("ip", {"dhcp"}), ("ip6", {"dhcp", "auto"})):
        address_text = options.get(name)
        if address_text is None or address_text in families:
            continue
        text = address_text
        try:
            interface = ipaddress.ip_interface(text)
        except ValueError as err:
            raise CloudInitError(key, f"{name}: invalid address '{text}'") from err
        version = 4 if name == "ip" else 6
        if "/" not in text or interface.version != version:
            raise CloudInitError(key, f"{name}: expected an IPv{version} CIDR, not '{text}'")
    for name, version in (("gw", 4), ("gw6", 6)):
        gateway_text = options.get(name)
        if gateway_text is None:
            continue
        text = gateway_text
        try:
            address = ipaddress.ip_address(text)
        except ValueError as err:
            raise CloudInitError(key, f"{name}: invalid address '{text}'") from err
        if address.version != version:
            raise CloudInitError(key, f"{name}: expected an IPv{version} address, not '{text}'")
        if options.get("ip" if version == 4 else "ip6", "dhcp") in {"dhcp", "auto"}:
            raise CloudInitError(key, f"{name}: a gateway needs a static address")
    return options


def _mac(config: Mapping[str, str], index: str) -> str | None:
    net = config.get(f"net{index}")
    if net is None:
        return None
    for part in net.split(","):
        name, _, text = part.partition("=")
        if re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", text) and name != "bridge":
            return text.lower()
        if name == "macaddr":
            return text.lower()
    return None


def validate(config: Mapping[str, str]) -> None:
    """Check every cloud-init option of ``config``; raises :class:`CloudInitError`."""
    seed_files(0, config)


def _subnets(options: Mapping[str, str]) -> list[str]:
    subnets: list[str] = []
    ip = options.get("ip")
    if ip == "dhcp":
        subnets += ["      - type: dhcp4"]
    elif ip is not None:
        interface = ipaddress.IPv4Interface(ip)
        subnets += [
            "      - type: static",
            f"        address: '{interface.ip}'",
            f"        netmask: '{interface.netmask}'",
        ]
        if "gw" in options:
            subnets.append(f"        gateway: '{options['gw']}'")
    ip6 = options.get("ip6")
    if ip6 == "dhcp":
        subnets += ["      - type: dhcp6"]
    elif ip6 == "auto":
        subnets += ["      - type: ipv6_slaac"]
    elif ip6 is not None:
        subnets += ["      - type: static6", f"        address: '{ip6}'"]
        if "gw6" in options:
            subnets.append(f"        gateway: '{options['gw6']}'")
    return subnets


def _nameservers(config: Mapping[str, str]) -> list[str]:
    nameservers = config.get("nameserver", "").replace(",", " ").split()
    domains = config.get("searchdomain", "").replace(",", " ").split()
    for server in nameservers:
        try:
            ipaddress.ip_address(server)
        except ValueError as err:
            raise CloudInitError("nameserver", f"invalid address '{server}'") from err
    for domain in domains:
        if not HOSTNAME.match(domain):
            raise CloudInitError("searchdomain", f"invalid domain name '{domain}'")
    if not (nameservers or domains):
        return []
    lines = ["    - type: nameserver"]
    if nameservers:
        lines.append("      address:")
        lines.extend(f"      - '{server}'" for server in nameservers)
    if domains:
        lines.append("      search:")
        lines.extend(f"      - '{domain}'" for domain in domains)
    return lines


def _network(config: Mapping[str, str]) -> str:
    lines = ["version: 1", "config:"]
    for key in sorted((k for k in config if IPCONFIG_KEY.match(k)), key=lambda k: int(k[8:])):
        index = key.removeprefix("ipconfig")
        options = _ipconfig(key, config[key])
        if f"net{index}" not in config:
            raise CloudInitError(key, f"no network device net{index} for {key}")
        lines.append("    - type: physical")
        lines.append(f"      name: eth{index}")
        mac = _mac(config, index)
        if mac is not None:
            lines.append(f"      mac_address: '{mac}'")
        subnets = _subnets(options)
        if subnets:
            lines.append("      subnets:")
            lines.extend(subnets)
    lines += _nameservers(config)
    if len(lines) == 2:
        lines[1] = "config: []"
    return "\n".join(lines) + "\n"


def _user(vmid: int, config: Mapping[str, str]) -> str:
    name = config.get("name") or f"VM{vmid}"
    domains = config.get("searchdomain", "").replace(",", " ").split()
    lines = ["#cloud-config", f"hostname: {name}", "manage_etc_hosts: true"]
    if domains:
        lines.append(f"fqdn: {name}.{domains[0]}")
    user = config.get("ciuser")
    if user is not None:
        if not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", user):
            raise CloudInitError("ciuser", f"invalid user name '{user}'")
        lines.append(f"user: {_yaml_string(user)}")
    password = config.get("cipassword")
    if password is not None:
        lines.append(f"password: {_yaml_string(_password(vmid, password))}")
    keys = _sshkeys(config["sshkeys"]) if config.get("sshkeys") else []
    if keys:
        lines.append("ssh_authorized_keys:")
        lines.extend(f"  - {_yaml_string(key)}" for key in keys)
    lines += ["chpasswd:", "  expire: False", "users:", "  - default"]
    upgrade = config.get("ciupgrade", "1")
    if upgrade not in {"0", "1"}:
        raise CloudInitError("ciupgrade", f"type check ('boolean') failed - got '{upgrade}'")
    lines.append(f"package_upgrade: {'true' if upgrade == '1' else 'false'}")
    return "\n".join(lines) + "\n"


def seed_files(vmid: int, config: Mapping[str, str]) -> dict[str, str]:
    """The NoCloud seed of a guest: ``meta-data``, ``user-data`` and ``network-config``."""
    citype = config.get("citype", "nocloud")
    if citype != "nocloud":
        raise CloudInitError("citype", f"only 'nocloud' is supported, not '{citype}'")
    user = _user(vmid, config)
    network = _network(config)
    digest = hashlib.sha1(  # noqa: S324 - an instance id, not a security digest
        (user + network).encode()
    ).hexdigest()
    name = config.get("name") or f"VM{vmid}"
    meta = f"instance-id: {digest}\nlocal-hostname: {name}\n"
    return {"meta-data": meta, "user-data": user, "network-config": network}
