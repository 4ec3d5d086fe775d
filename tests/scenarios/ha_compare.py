"""Comparing HA simulator logs with Proxmox's: per service and per node, in order."""

from __future__ import annotations

import re
from collections import defaultdict

SERVICE = re.compile(r"service '([^']+)': state changed from '[^']*' to '[^']*'.*$")
NODE = re.compile(r"node '([^']+)': state changed from '[^']*' => '[^']*'$")
RECOVER = re.compile(r"recover service '([^']+)' from fenced node '[^']*' to node '[^']*'$")


def transitions(lines: list[str]) -> dict[str, list[str]]:
    """The compared lines of a log, grouped by the service or node each is about."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        _, _, message = line.partition(": ")
        message = message.strip()
        for pattern, prefix in ((SERVICE, "service"), (NODE, "node"), (RECOVER, "service")):
            if match := pattern.search(message):
                grouped[f"{prefix} {match.group(1)}"].append(match.group(0))
                break
    return dict(grouped)


def differences(expected: list[str], actual: list[str]) -> list[str]:
    """Each service or node whose sequence differs, with the first differing line."""
    want, got = transitions(expected), transitions(actual)
    problems = []
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key, []), got.get(key, [])
        if a != b:
            index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            if index is None:
                index = min(len(a), len(b))
            first = a[index] if index < len(a) else "<end>"
            second = b[index] if index < len(b) else "<end>"
            problems.append(f"{key} #{index}: expected {first!r}, got {second!r}")
    return problems
