"""Proxmox's own HA regression scenarios, run in Rucher's simulator and compared with Proxmox's log.

Each scenario folder is copied without its ``log.expect`` and run by the simulator; for every
service and every node, its own sequence of state transitions and recoveries must equal the
sequence in Proxmox's ``log.expect`` (timestamps and the interleaving between different services
and nodes are free).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rucher.ha.sim.cli import simulate
from tests.scenarios.ha_compare import differences, transitions

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "pve-ha-manager"
SCENARIOS = sorted(path.name for path in FIXTURES.iterdir() if path.is_dir())
REQUIRED_RATIO = 0.90


# Scenarios that do not match Proxmox yet, each with the reason (strict xfail: a fix is noticed).
KNOWN_FAILING: dict[str, str] = {}


def run_scenario(name: str, tmp_path: Path) -> list[str]:
    """The differences between the simulator's run of ``name`` and Proxmox's log."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    (folder / "log.expect").unlink()
    lines = simulate(folder, emit=lambda line: None)
    return differences((FIXTURES / name / "log.expect").read_text().splitlines(), lines)


def test_there_are_104_scenarios():
    assert len(SCENARIOS) == 104


def test_every_known_failure_names_a_scenario_and_a_reason():
    for name, reason in KNOWN_FAILING.items():
        assert name in SCENARIOS
        assert reason.strip()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.xfail(reason=KNOWN_FAILING[name], strict=True)
            if name in KNOWN_FAILING
            else (),
        )
        for name in SCENARIOS
    ],
)
def test_scenario_matches_proxmox(name, tmp_path):
    assert run_scenario(name, tmp_path) == []


def test_pass_ratio(tmp_path):
    passed = sum(1 for name in SCENARIOS if not run_scenario(name, tmp_path / "ratio"))
    assert passed / len(SCENARIOS) >= REQUIRED_RATIO, f"{passed} of {len(SCENARIOS)} match"


def test_the_comparison_catches_a_wrong_recovery_target():
    expected = [
        "info 240 node1/crm: recover service 'vm:103' from fenced node 'node3' to node 'node2'"
    ]
    actual = [
        "info 240 node1/crm: recover service 'vm:103' from fenced node 'node3' to node 'node1'"
    ]
    assert differences(expected, actual)


def test_the_comparison_ignores_interleaving_between_services():
    first = "info 20 node1/crm: service 'vm:101': state changed from 'request_start' to 'started'"
    second = "info 20 node1/crm: service 'vm:102': state changed from 'request_start' to 'started'"
    assert differences([first, second], [second, first]) == []
    assert set(transitions([first, second])) == {"service vm:101", "service vm:102"}
