"""The split-brain checker against real QEMU processes in two network namespaces ("nodes").

The negative control starts one guest on two nodes on purpose and shows the checker fails; a
clean hand-over from one node to the other passes.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from rucher.testing.netns import netns_unavailable
from rucher.testing.qemu_checker import QemuChecker, netns_inode

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")
if netns_unavailable() or QEMU is None:
    pytest.skip("needs root, iproute2 and qemu-system-x86_64", allow_module_level=True)


@pytest.fixture
def two_nodes() -> Iterator[dict[str, str]]:
    """Two network namespaces standing for nodes a and b."""
    run = secrets.token_hex(3)
    names = {"a": f"rqc{run}a", "b": f"rqc{run}b"}
    for namespace in names.values():
        subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        yield names
    finally:
        for namespace in names.values():
            subprocess.run(["ip", "netns", "del", namespace], check=False)


def start_guest(namespace: str, guest: str) -> subprocess.Popen[bytes]:
    """An idle QEMU (no machine, paused) naming ``guest``, inside ``namespace``."""
    assert QEMU is not None
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, QEMU, "-machine", "none", "-display", "none",
         "-nodefaults", "-S", "-name", f"guest={guest},debug-threads=on"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(10)


def wait_running(checker: QemuChecker, guest: str, nodes: set[str]) -> None:
    deadline = time.monotonic() + 10
    while checker.running().get(guest, set()) != nodes:
        assert time.monotonic() < deadline, checker.running()
        time.sleep(0.02)


@pytest.mark.parametrize("sampler", ["process", "thread"])
def test_one_guest_on_two_nodes_fails_the_checker(two_nodes, sampler):
    guest = f"rucher-{secrets.randbelow(10**6) + 10**6}"
    nodes = {netns_inode(ns): node for node, ns in two_nodes.items()}
    with QemuChecker(nodes, guests=lambda name: name == guest, sampler=sampler) as checker:
        first = start_guest(two_nodes["a"], guest)
        second = start_guest(two_nodes["b"], guest)
        try:
            wait_running(checker, guest, {"a", "b"})
        finally:
            stop(first)
            stop(second)
    runs = checker.double_runs(strict=False)
    assert len(runs) == 1 and set(runs[0].nodes) == {"a", "b"}
    with pytest.raises(AssertionError, match=f"split brain: {guest} ran on"):
        checker.assert_no_double_runs()
    assert checker.max_gap < 1.0  # sampled every 50 ms; a busy machine may delay a sample


def test_a_hand_over_between_nodes_passes(two_nodes):
    guest = f"rucher-{secrets.randbelow(10**6) + 10**6}"
    nodes = {netns_inode(ns): node for node, ns in two_nodes.items()}
    with QemuChecker(nodes, guests=lambda name: name == guest) as checker:
        first = start_guest(two_nodes["a"], guest)
        wait_running(checker, guest, {"a"})
        stop(first)
        wait_running(checker, guest, set())
        time.sleep(0.2)
        second = start_guest(two_nodes["b"], guest)
        try:
            wait_running(checker, guest, {"b"})
        finally:
            stop(second)
    checker.assert_no_double_runs()
    assert [node for node, _, _ in checker.log.placements(guest)] == ["a", "b"]
    assert checker.samples > 5
