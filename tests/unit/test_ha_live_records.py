"""The live HA service's conversions between the core's values and the cluster store's documents."""

from __future__ import annotations

import pytest

from rucher.ha.live.records import (
    control_commands,
    guest_stats,
    lrm_to_record,
    public_status,
    record_to_lrm,
    record_to_state,
    rules_config,
    service_configs,
    state_to_record,
)
from rucher.ha.live.settings import LiveSettings
from rucher.ha.model import DisarmState, LrmResult, LrmStatus, ManagerState, ServiceData
from rucher.ha.service import REBOOT_FLAG, reboot_requested
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.ha import (
    Affinity,
    ArmedState,
    DisarmMode,
    HaControl,
    HaGroup,
    HaGroups,
    HaResource,
    HaResources,
    HaRule,
    HaRules,
    NodeState,
    RequestedState,
    RuleType,
    ServiceState,
)
from rucher.service import SettingsError


def guest(vmid: int, node: str, **config: str) -> GuestRecord:
    return GuestRecord(vmid=vmid, type=GuestType.QEMU, node=node, config=config, digest="x")


def test_the_managers_whole_state_survives_its_document():
    state = ManagerState(
        master_node="n1",
        timestamp=12.5,
        node_status={"n1": "online", "n2": "fence"},
        service_status={
            "vm:100": ServiceData(
                state="migrate",
                node="n1",
                uid="migrate-ab-3",
                target="n2",
                failed_nodes=["n3"],
                maintenance_node="n1",
                cmd=["migrate", "n2"],
                timeout=30,
            )
        },
        node_request={"n3": {"maintenance": True}},
        disarm=DisarmState(mode="freeze", applied=True),
    )
    record = state_to_record(state, token=42, epochs={"n1": 7})
    assert record.manager_token == 42 and record.node_epochs == {"n1": 7}
    assert record_to_state(record) == state
    assert record_to_state(None) == ManagerState()


def test_the_public_status_speaks_proxmoxs_states():
    state = ManagerState(
        master_node="n1",
        node_status={"n1": "online"},
        service_status={"vm:100": ServiceData(state="request_start_balance", node="n1")},
        disarm=DisarmState(mode="ignore", disarmed=True),
    )
    status = public_status(state_to_record(state, token=1, epochs={}))
    assert status.service_status["vm:100"].state is ServiceState.REQUEST_START
    assert status.node_status == {"n1": NodeState.ONLINE}
    assert status.armed_state is ArmedState.DISARMED
    assert status.disarm_mode is DisarmMode.IGNORE
    state.disarm = DisarmState(mode="freeze")
    assert public_status(state_to_record(state, 1, {})).armed_state is ArmedState.DISARMING
    state.disarm = None
    assert public_status(state_to_record(state, 1, {})).armed_state is ArmedState.ARMED


def test_an_lrm_status_survives_its_document():
    status = LrmStatus(
        state="active",
        mode="maintenance",
        results={"started-x-1": LrmResult(sid="vm:100", state="started", exit_code=0)},
        timestamp=3.0,
    )
    record = lrm_to_record("n2", status)
    assert record.node == "n2"
    assert record_to_lrm(record) == status
    assert record_to_lrm(None) == LrmStatus()


def test_a_resource_runs_on_its_guests_owner_and_a_missing_guest_is_left_out():
    resources = HaResources(
        resources={
            "vm:100": HaResource(sid="vm:100", max_restart=3, failback=False, group="g"),
            "vm:101": HaResource(sid="vm:101", state=RequestedState.STOPPED),
            "ct:200": HaResource(sid="ct:200"),
        }
    )
    configs = service_configs(resources, {100: guest(100, "n2"), 101: guest(101, "n3")})
    assert set(configs) == {"vm:100", "vm:101"}
    assert configs["vm:100"].node == "n2" and configs["vm:100"].max_restart == 3
    assert configs["vm:100"].failback is False and configs["vm:100"].group == "g"
    assert configs["vm:101"].state == "stopped"


def test_rules_skip_disabled_ones_and_keep_groups():
    rules = HaRules(
        rules={
            "pin": HaRule(
                rule="pin",
                type=RuleType.NODE_AFFINITY,
                resources=("vm:100",),
                nodes={"n1": 2, "n2": 1},
                strict=True,
            ),
            "apart": HaRule(
                rule="apart",
                type=RuleType.RESOURCE_AFFINITY,
                resources=("vm:100", "vm:101"),
                affinity=Affinity.NEGATIVE,
            ),
            "off": HaRule(
                rule="off", type=RuleType.NODE_AFFINITY, resources=("vm:101",), disable=True
            ),
        }
    )
    groups = HaGroups(groups={"g": HaGroup(group="g", nodes={"n3": 1}, nofailback=True)})
    config = rules_config(rules, groups)
    assert [r.name for r in config.node_affinity] == ["pin"]
    assert config.node_affinity[0].strict and config.node_affinity[0].nodes == {"n1": 2, "n2": 1}
    assert [(r.name, r.affinity) for r in config.resource_affinity] == [("apart", "negative")]
    assert config.groups["g"].nofailback and config.groups["g"].nodes == {"n3": 1}


def test_the_administrators_wishes_become_manager_commands_once():
    state = ManagerState(node_request={"n1": {"maintenance": True}})
    control = HaControl(armed=False, disarm_mode=DisarmMode.IGNORE, maintenance=("n2",))
    assert control_commands(control, state) == [
        "disarm-ha ignore",
        "enable-node-maintenance n2",
        "disable-node-maintenance n1",
    ]
    state = ManagerState(node_request={"n2": {"maintenance": True}}, disarm=DisarmState("ignore"))
    assert control_commands(control, state) == []
    assert control_commands(HaControl(maintenance=("n2",)), state) == ["arm-ha"]


def test_guest_stats_use_proxmoxs_defaults():
    assert guest_stats(None) == (0.0, 0.0)
    assert guest_stats(guest(100, "n1")) == (1.0, 512 * 1024 * 1024)
    assert guest_stats(guest(100, "n1", cores="2", sockets="2", memory="256")) == (
        4.0,
        256 * 1024 * 1024,
    )
    assert guest_stats(guest(100, "n1", vcpus="3", cores="4"))[0] == 3.0


def test_live_settings_name_the_variable_at_fault():
    assert LiveSettings.from_env({}).cluster.fence_delay == 0.0
    settings = LiveSettings.from_env({"RUCHER_HA_ROUND_INTERVAL": "0.5", "RUCHER_HA_CRS_MODE": ""})
    assert settings.round_interval == 0.5 and settings.crs_mode == "basic"
    with pytest.raises(SettingsError, match="RUCHER_HA_ROUND_INTERVAL"):
        LiveSettings.from_env({"RUCHER_HA_ROUND_INTERVAL": "soon"})
    with pytest.raises(SettingsError, match="RUCHER_HA_CRS_MODE"):
        LiveSettings.from_env({"RUCHER_HA_CRS_MODE": "fastest"})
    with pytest.raises(SettingsError, match="RUCHER_HA_SHUTDOWN_POLICY"):
        LiveSettings.from_env({"RUCHER_HA_SHUTDOWN_POLICY": "panic"})
    with pytest.raises(SettingsError, match="RUCHER_HA_FENCE_DELAY"):
        LiveSettings.from_env({"RUCHER_HA_FENCE_DELAY": "-1"})
    assert LiveSettings.from_env({}).shutdown_timeout == 8.0
    assert LiveSettings.from_env({"RUCHER_HA_SHUTDOWN_TIMEOUT": "30"}).shutdown_timeout == 30.0
    with pytest.raises(SettingsError, match="RUCHER_HA_SHUTDOWN_TIMEOUT"):
        LiveSettings.from_env({"RUCHER_HA_SHUTDOWN_TIMEOUT": "-1"})


def test_a_reboot_flag_counts_once_and_its_absence_means_shutdown(tmp_path):
    assert not reboot_requested(tmp_path)
    (tmp_path / REBOOT_FLAG).write_text("")
    assert reboot_requested(tmp_path)
    assert not reboot_requested(tmp_path)
