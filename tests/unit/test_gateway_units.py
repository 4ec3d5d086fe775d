"""The gateway's pieces without a bus: settings, certificate, clauses, presentation, OpenAPI."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509

from rucher.gateway import certs, openapi, present
from rucher.gateway.__main__ import bundled_schema
from rucher.gateway.config import GatewaySettings
from rucher.gateway.permissions import Checker, can_modify_acl, require
from rucher.proto.cluster import CpuArch, NodeCapacity, NumaNode
from rucher.proto.common import PowerState
from rucher.proto.guest import GuestLock, GuestRecord, GuestType
from rucher.proto.iam_state import AclRecord, AclSubjectType, GroupRecord, RoleRecord, UserRecord
from rucher.proto.task import TaskState, TaskStatus
from rucher.pve.acl import AclIndex
from rucher.pve.params import Params
from rucher.pve.schema import Permissions
from rucher.service import Settings, SettingsError

from .pve_fixtures import schema


def _settings(tmp_path: Path) -> Settings:
    return Settings.from_env("gateway", {"RUCHER_STATE_DIR": str(tmp_path)})


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9006", "127.0.0.1", 9006),
        ("[::]:8443", "::", 8443),
        (":8006", "0.0.0.0", 8006),
        ("10.0.0.5", "10.0.0.5", 8006),
    ],
)
def test_listen_addresses(tmp_path, listen, host, port):
    settings = GatewaySettings.from_env(_settings(tmp_path), {"RUCHER_GATEWAY_LISTEN": listen})
    assert (settings.host, settings.port) == (host, port)


def test_defaults_and_the_dev_stack_variables(tmp_path):
    default = GatewaySettings.from_env(_settings(tmp_path), {})
    assert (default.host, default.port, default.generated_cert) == ("0.0.0.0", 8006, True)
    assert default.cert_file == tmp_path / "gateway" / "pve-ssl.pem"
    stack = GatewaySettings.from_env(
        _settings(tmp_path), {"RUCHER_GATEWAY_HOST": "127.0.0.1", "RUCHER_GATEWAY_PORT": "9"}
    )
    assert (stack.host, stack.port) == ("127.0.0.1", 9)


def test_bad_settings_name_the_variable(tmp_path):
    with pytest.raises(SettingsError, match="RUCHER_GATEWAY_LISTEN"):
        GatewaySettings.from_env(_settings(tmp_path), {"RUCHER_GATEWAY_LISTEN": "host:http"})
    with pytest.raises(SettingsError, match="both"):
        GatewaySettings.from_env(_settings(tmp_path), {"RUCHER_GATEWAY_CERT": "/x.pem"})
    with pytest.raises(SettingsError, match="RUCHER_GATEWAY_CERT"):
        GatewaySettings.from_env(
            _settings(tmp_path),
            {"RUCHER_GATEWAY_CERT": str(tmp_path / "no.pem"), "RUCHER_GATEWAY_KEY": "/k"},
        )


def test_a_self_signed_certificate_is_made_once_and_renewed_near_expiry(tmp_path, monkeypatch):
    cert, key = tmp_path / "tls" / "c.pem", tmp_path / "tls" / "k.pem"
    assert certs.ensure_self_signed(cert, key, node="n1") is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"n1", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    lifetime = loaded.not_valid_after_utc - loaded.not_valid_before_utc
    assert lifetime > datetime.timedelta(days=3000)
    assert certs.ensure_self_signed(cert, key, node="n1") is False
    monkeypatch.setattr(certs, "RENEW_BEFORE", datetime.timedelta(days=4000))
    assert certs.ensure_self_signed(cert, key, node="n1") is True


# Permission clauses ------------------------------------------------------------------------


def _index(*acl: AclRecord, groups: dict[str, tuple[str, ...]] | None = None) -> AclIndex:
    members = groups or {}
    users = [
        UserRecord(userid=userid, groups=tuple(g for g, who in members.items() if userid in who))
        for userid in ("boss@pve", "alice@pve", "bob@pve", "carol@pve")
    ]
    return AclIndex.build(
        users,
        [GroupRecord(groupid=g) for g in members],
        [
            RoleRecord(roleid="Modifier", privs=("User.Modify",)),
            RoleRecord(roleid="RealmUser", privs=("Realm.AllocateUser",)),
            RoleRecord(roleid="Perms", privs=("Permissions.Modify",)),
        ],
        acl,
        (),
    )


def _entry(path: str, ugid: str, role: str) -> AclRecord:
    return AclRecord(path=path, ugid=ugid, type=AclSubjectType.USER, roleid=role)


def test_perm_clauses_fill_the_path_and_honour_any():
    index = _index(_entry("/nodes/n1", "alice@pve", "PVEAuditor"))
    params = Params({"node": "n1"})
    assert Checker(index, "alice@pve", params).check(["perm", "/nodes/{node}", ["Sys.Audit"]])
    assert not Checker(index, "alice@pve", params).check(
        ["perm", "/nodes/{node}", ["Sys.Audit", "Sys.Modify"]]
    )
    assert Checker(index, "alice@pve", params).check(
        ["perm", "/nodes/{node}", ["Sys.Modify", "Sys.Audit"], "any", 1]
    )
    assert not Checker(index, "alice@pve", Params({"node": "n2"})).check(
        ["perm", "/nodes/{node}", ["Sys.Audit"]]
    )


def test_userid_clauses():
    index = _index(
        _entry("/access/realm/pve", "boss@pve", "RealmUser"),
        _entry("/access/groups/ops", "boss@pve", "Modifier"),
        groups={"ops": ("bob@pve",), "dev": ("carol@pve",)},
    )
    password = [
        "or",
        ["userid-param", "self"],
        ["and", ["userid-param", "Realm.AllocateUser"], ["userid-group", ["User.Modify"]]],
    ]
    assert Checker(index, "alice@pve", Params({"userid": "alice@pve"})).check(password)
    assert not Checker(index, "alice@pve", Params({"userid": "bob@pve"})).check(password)
    assert Checker(index, "boss@pve", Params({"userid": "bob@pve"})).check(password)
    assert not Checker(index, "boss@pve", Params({"userid": "carol@pve"})).check(password)
    # The token of a user is not "self" for that user.
    assert not Checker(index, "alice@pve!ci", Params({"userid": "alice@pve"})).check(
        ["userid-param", "self"]
    )
    create = ["userid-group", ["User.Modify"], "groups_param", "create"]
    new = {"userid": "new@pve"}
    assert Checker(index, "boss@pve", Params({**new, "groups": "ops"})).check(create)
    assert not Checker(index, "boss@pve", Params({**new, "groups": "ops,dev"})).check(create)
    assert not Checker(index, "boss@pve", Params(new)).check(create)


def test_perm_modify_needs_the_objects_allocate_privilege_or_permissions_modify():
    index = _index(
        _entry("/vms/100", "alice@pve", "PVEVMAdmin"),
        _entry("/storage", "bob@pve", "Perms"),
    )
    assert can_modify_acl(index, "alice@pve", "/vms/100")
    assert not can_modify_acl(index, "alice@pve", "/vms/101")
    assert can_modify_acl(index, "bob@pve", "/storage/local")
    assert not can_modify_acl(index, "alice@pve", "/")


def test_require_world_all_and_check():
    index = _index()
    require(Permissions(user="world"), index, None, Params({}))
    with pytest.raises(Exception, match="authentication required"):
        require(Permissions(user="all"), index, None, Params({}))
    require(Permissions(user="all"), index, "carol@pve", Params({}))
    with pytest.raises(Exception, match="Permission check failed"):
        require(Permissions(check=("perm", "/", ["Sys.Audit"])), index, "carol@pve", Params({}))


def test_every_clause_of_the_schema_is_understood():
    index = _index()
    for endpoint in schema().endpoints:
        if endpoint.permissions.check:
            params = Params(dict.fromkeys(endpoint.parameters.properties, "x@pve"))
            Checker(index, "carol@pve", params).check(endpoint.permissions.check)


# Presentation ------------------------------------------------------------------------------


def test_guests_in_proxmox_resource_shape():
    record = GuestRecord(
        vmid=100,
        type=GuestType.QEMU,
        node="n1",
        config={
            "name": "web",
            "memory": "current=2048",
            "cores": "2",
            "sockets": "2",
            "template": "1",
            "tags": "prod",
        },
        digest="0" * 40,
        lock=GuestLock.BACKUP,
    )
    entry = present.guest_resource(record, PowerState.PAUSED, "pool1", 8)
    assert entry == {
        "id": "qemu/100", "type": "qemu", "vmid": 100, "node": "n1", "name": "web",
        "status": "running", "maxcpu": 4, "maxmem": 2048 << 20, "template": 1,
        "tags": "prod", "lock": "backup", "pool": "pool1",
    }  # fmt: skip
    container = GuestRecord(vmid=101, type=GuestType.LXC, node="n1", config={}, digest="0" * 40)
    entry = present.guest_resource(container, None, None, 8)
    assert (entry["name"], entry["maxcpu"], entry["status"]) == ("CT101", 8, "unknown")


def test_tasks_split_token_users_and_show_end_states():
    task = TaskState(
        upid="UPID:n1:00000001:00000002:00000003:qmstart:100:a@pve!ci:",
        node="n1", pid=1, pstart=2, starttime=3, type="qmstart", id="100", user="a@pve!ci",
        worker="w", status=TaskStatus.STOPPED, exitstatus="OK", endtime=9.5,
    )  # fmt: skip
    assert present.task_entry(task)["user"] == "a@pve"
    assert present.task_entry(task)["tokenid"] == "ci"
    assert (present.task_entry(task)["status"], present.task_entry(task)["endtime"]) == ("OK", 9)
    assert present.task_status(task)["status"] == "stopped"
    assert present.task_status(task)["exitstatus"] == "OK"


def test_node_status_from_capacity():
    capacity = NodeCapacity(
        node="n1", arch=CpuArch.X86_64, cpu_model="EPYC", cpus=8, sockets=2,
        memory_total=100, memory_used=40, time=0.0, loadavg=(1.0, 0.5, 0.25),
        numa=(NumaNode(id=0, cpus=(0, 1, 2, 3), memory=50),
              NumaNode(id=1, cpus=(4, 5, 6, 7), memory=50)),
    )  # fmt: skip
    status = present.node_status(capacity)
    assert status["cpuinfo"] == {"cpus": 8, "sockets": 2, "cores": 4, "model": "EPYC", "flags": ""}
    assert status["memory"] == {"total": 100, "used": 40, "free": 60}
    assert status["loadavg"] == ["1.00", "0.50", "0.25"]


# OpenAPI -----------------------------------------------------------------------------------


def test_openapi_documents_every_endpoint_with_its_parameters():
    bundled = bundled_schema()
    document = openapi.build(bundled, "/api2/json", "0.1.0")
    operations = [
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    ]
    assert len(operations) == len(bundled.endpoints)
    tasks = document["paths"]["/api2/json/nodes/{node}/tasks"]["get"]
    limit = next(p for p in tasks["parameters"] if p["name"] == "limit")
    assert limit == {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0, "default": 50,
                   "description": "Only list this number of tasks."},
    }  # fmt: skip
    node = next(p for p in tasks["parameters"] if p["name"] == "node")
    assert node["in"] == "path" and node["schema"]["x-pve-format"] == "pve-node"
    assert tasks["security"] == [{"ticket": []}, {"token": []}]
    password = document["paths"]["/api2/json/access/password"]["put"]
    assert password["security"] == [{"ticket": [], "csrf": []}]
