"""Linux network plumbing for the harness, through the ``ip`` command: namespaces, a bridge, veths.

Everything here shells out to iproute2 (``ip netns exec`` rather than ``setns`` from Python), so
what the harness does can be repeated by hand from a shell when a test needs debugging.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Where a run's /24 is picked from: the three private ranges, so a machine whose own networks
# cover one of them still leaves room in the others.
PRIVATE_RANGES = [
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
]
LOCK_FILE = Path(tempfile.gettempdir()) / "rucher-harness.lock"


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""

    def __init__(self, argv: list[str], stderr: str) -> None:
        super().__init__(f"{' '.join(argv)}: {stderr.strip()}")
        self.argv = argv
        self.stderr = stderr


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip ARGS`` (inside ``netns`` when given: ``ip -n NETNS ARGS``) and return its output."""
    argv = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(argv, result.stderr)
    return result.stdout


def ip_json(*args: str) -> list[dict[str, Any]]:
    """Run ``ip -j ARGS`` and decode its JSON."""
    output = ip("-j", *args)
    return list(json.loads(output)) if output.strip() else []


def netns_unavailable() -> str | None:
    """Why namespaces, bridges and veths cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces, a bridge and veth pairs"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing: run ops/install"
    probe = f"rhprobe{os.getpid() % 100000}"
    try:
        ip("netns", "add", probe)
        ip("link", "add", probe, "type", "bridge")
    except NetnsError as err:
        return f"cannot create a network namespace or a bridge: {err}"
    finally:
        ip("link", "del", probe, check=False)
        ip("netns", "del", probe, check=False)
    return None


def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks this machine already uses: every interface address and every route."""
    networks = [
        ipaddress.IPv4Network(f"{address['local']}/{address['prefixlen']}", strict=False)
        for link in ip_json("-4", "addr")
        for address in link.get("addr_info", [])
    ]
    for route in ip_json("-4", "route", "show", "table", "all"):
        destination = route.get("dst", "default")
        if destination != "default":
            networks.append(ipaddress.IPv4Network(destination, strict=False))
    return networks


def pick_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A private /24 that overlaps no address or route on this machine.

    Call it under ``subnet_lock`` and assign the bridge address before releasing the lock, so
    two harness runs starting together cannot pick the same one.
    """
    rng = rng or random.Random()  # noqa: S311 - picking a subnet, not a secret
    used = used_networks()
    for _ in range(1000):
        private = rng.choice(PRIVATE_RANGES)
        index = rng.randrange(private.num_addresses // 256)
        candidate = ipaddress.IPv4Network((int(private.network_address) + index * 256, 24))
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise RuntimeError("no free private /24 found for the harness")


@contextlib.contextmanager
def subnet_lock() -> Iterator[None]:
    """Serialise subnet choice across every harness run on this machine."""
    with LOCK_FILE.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def namespaces() -> set[str]:
    """Names of the existing network namespaces."""
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def links() -> set[str]:
    """Names of the network interfaces in the root namespace."""
    return {link["ifname"] for link in ip_json("link")}


def netns_pids(namespace: str) -> list[int]:
    """Every process running inside ``namespace``."""
    output = ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in output.split()]
