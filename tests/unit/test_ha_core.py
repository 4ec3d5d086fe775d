"""The HA decision core: node states, rules, CRS usage; the simulator's safety and input checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rucher.ha.model import (
    Group,
    NodeAffinityRule,
    NodeCapacity,
    ResourceAffinityRule,
    ResourceStats,
    RulesConfig,
    ServiceConfig,
    ServiceData,
)
from rucher.ha.node_status import NodeStatus
from rucher.ha.rules import (
    apply_positive,
    compile_rules,
    get_node_affinity,
    get_resource_affinity,
    groups_to_rules,
)
from rucher.ha.sim import cli
from rucher.ha.sim.hardware import Hardware
from rucher.ha.sim.run import run
from rucher.ha.sim.scenario import ScenarioError, load
from rucher.ha.usage import Usage

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "pve-ha-manager"


class Clock:
    """Just enough environment for NodeStatus: a clock, a log and agent locks."""

    def __init__(self) -> None:
        self.time = 0.0
        self.lines: list[str] = []
        self.lock_free = False

    def now(self) -> float:
        return self.time

    def log(self, level: str, message: str) -> None:
        self.lines.append(message)

    def get_agent_lock(self, node: str | None = None) -> bool:
        return self.lock_free


def test_a_node_is_fenced_only_after_sixty_seconds_away_and_with_its_lock():
    env = Clock()
    status = NodeStatus(env, {})  # type: ignore[arg-type]
    status.update({"n1": True, "n2": True}, {})
    env.time = 10
    status.update({"n1": True, "n2": False}, {})
    assert status.get_node_state("n2") == "unknown"
    env.time = 59  # last seen online at 0
    assert not status.node_is_offline_delayed("n2")
    env.time = 60
    assert status.node_is_offline_delayed("n2")
    assert not status.fence_node("n2")
    assert status.get_node_state("n2") == "fence"
    env.lock_free = True
    assert status.fence_node("n2")
    assert status.get_node_state("n2") == "unknown"
    assert "node 'n2': state changed from 'unknown' => 'fence'" in env.lines


def test_maintenance_follows_the_lrm_mode():
    env = Clock()
    status = NodeStatus(env, {"n1": "online"})  # type: ignore[arg-type]
    status.update({"n1": True}, {"n1": "maintenance"})
    assert status.get_node_state("n1") == "maintenance"
    status.update({"n1": False}, {"n1": "maintenance"})
    assert status.get_node_state("n1") == "maintenance"
    status.update({"n1": True}, {"n1": "active"})
    assert status.get_node_state("n1") == "online"


def test_a_member_in_maintenance_is_never_offline_even_without_fence_delay():
    env = Clock()
    status = NodeStatus(env, {"n1": "online"})  # type: ignore[arg-type]
    status.fence_delay = 0.0
    status.update({"n1": True}, {"n1": "maintenance"})
    env.time = 5
    status.update({"n1": True}, {"n1": "maintenance"})
    assert status.get_node_state("n1") == "maintenance"
    assert not status.node_is_offline_delayed("n1")
    env.time = 6
    status.update({"n1": False}, {"n1": "maintenance"})  # gone while in maintenance
    assert status.node_is_offline_delayed("n1")


def test_groups_become_node_affinity_rules_with_priorities():
    config = RulesConfig(groups={"g": Group(name="g", nodes={"n1": 2, "n2": 0}, restricted=True)})
    services = {"vm:100": ServiceConfig(sid="vm:100", node="n1", group="g")}
    compiled = compile_rules(groups_to_rules(config, services), ["n1", "n2", "n3"])
    allowed, best = get_node_affinity(compiled, "vm:100", {"n1", "n2", "n3"})
    assert allowed == {"n1", "n2"}
    assert best == {"n1"}
    allowed, best = get_node_affinity(compiled, "vm:100", {"n2", "n3"})
    assert allowed == best == {"n2"}


def test_a_non_strict_rule_falls_back_to_every_online_node():
    rule = NodeAffinityRule(name="r", resources=("vm:100",), nodes={"n1": 0})
    compiled = compile_rules(RulesConfig(node_affinity=(rule,)), ["n1", "n2"])
    assert get_node_affinity(compiled, "vm:100", {"n2"}) == ({"n2"}, {"n2"})


def test_a_negative_rule_extends_to_positive_partners():
    config = RulesConfig(
        resource_affinity=(
            ResourceAffinityRule(name="p", resources=("vm:201", "vm:202"), affinity="positive"),
            ResourceAffinityRule(name="n", resources=("vm:201", "vm:101"), affinity="negative"),
        )
    )
    compiled = compile_rules(config, ["n1", "n2"])
    status = {
        "vm:202": ServiceData(state="started", node="n1"),
        "vm:201": ServiceData(state="stopped", node="n2"),
    }
    together, separate = get_resource_affinity(compiled, "vm:101", status, {"n1", "n2"})
    assert separate == {"n1"}
    assert together == {}


def test_positive_affinity_keeps_the_usable_node_most_partners_use():
    nodes = {"n1", "n2"}
    apply_positive({"n3": 2, "n2": 1}, nodes)
    assert nodes == {"n2"}


def test_basic_usage_counts_services_and_moves_count_on_their_target():
    usage = Usage("basic", ["n1", "n2"], lambda n: NodeCapacity(), lambda s: ResourceStats())
    usage.add_service("vm:100", "started", "n1", None)
    usage.add_service("vm:101", "migrate", "n1", "n2")
    usage.add_service("vm:102", "stopped", "n2", None)
    assert usage.scores("vm:103") == {"n1": 1.0, "n2": 1.0}
    usage.remove_service("vm:101")
    assert usage.scores("vm:103") == {"n1": 1.0, "n2": 0.0}


def test_static_usage_prefers_the_emptier_node():
    capacity = {"n1": NodeCapacity(8, 64e9), "n2": NodeCapacity(8, 64e9)}
    stats = {"vm:100": ResourceStats(maxcpu=4, maxmem=32e9), "vm:101": ResourceStats(2, 8e9)}
    usage = Usage("static", ["n1", "n2"], capacity.__getitem__, stats.__getitem__)
    usage.add_service("vm:100", "started", "n1", None)
    scores = usage.scores("vm:101")
    assert scores["n2"] < scores["n1"]


def doubly_running(hardware: Hardware) -> set[str]:
    """Guests that run on more than one simulated node right now."""
    running = [sid for node in hardware.nodes.values() for sid in node.running]
    return {sid for sid in running if running.count(sid) > 1}


def test_no_guest_ever_runs_on_two_nodes_in_any_scenario():
    for folder in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        hardware = Hardware(load(folder), lambda line: None)
        doubles: list[str] = []

        def check(line: str, hardware: Hardware = hardware, doubles: list[str] = doubles) -> None:
            if doubly_running(hardware):
                doubles.append(line)

        hardware.emit = check
        assert run(hardware)
        assert doubles == [], folder.name


def test_the_double_run_check_sees_a_guest_on_two_nodes():
    hardware = Hardware(load(FIXTURES / "test-basic1"), lambda line: None)
    hardware.nodes["node1"].running.add("vm:101")
    hardware.nodes["node2"].running.add("vm:101")
    assert doubly_running(hardware) == {"vm:101"}


def write_scenario(folder: Path, commands: object, services: object) -> None:
    folder.mkdir()
    nodes = {f"node{i}": {"power": "off", "network": "off"} for i in (1, 2, 3)}
    (folder / "hardware_status").write_text(json.dumps(nodes))
    (folder / "manager_status").write_text("{}")
    (folder / "service_config").write_text(json.dumps(services))
    (folder / "cmdlist").write_text(json.dumps(commands))


def test_the_command_runs_a_scenario_and_prints_proxmox_lines(tmp_path, capsys):
    folder = tmp_path / "basic"
    commands = [["power node1 on", "power node2 on", "power node3 on"], ["network node3 off"]]
    write_scenario(folder, commands, {"vm:103": {"node": "node3", "state": "started"}})
    assert cli.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "recover service 'vm:103' from fenced node 'node3' to node 'node1'" in out
    assert "service 'vm:103': state changed from 'fence' to 'recovery'" in out


@pytest.mark.parametrize(
    ("commands", "services", "message"),
    [
        ([["power node9 on"]], {}, "no such node 'node9'"),
        ([["explode node1"]], {}, "unknown command 'explode'"),
        ("power node1 on", {}, "cmdlist: expected a JSON list"),
        ([[]], {"vm:1x": {"node": "node1"}}, "invalid HA resource id"),
        ([[]], {"vm:100": {"state": "started"}}, "without assigned node"),
    ],
)
def test_bad_scenarios_fail_with_a_clear_message(tmp_path, capsys, commands, services, message):
    folder = tmp_path / "bad"
    write_scenario(folder, commands, services)
    assert cli.main([str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_folder_is_refused():
    with pytest.raises(ScenarioError):
        load(Path("/nonexistent/scenario"))
