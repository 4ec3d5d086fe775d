"""The IAM service's requests against a real nats-server and the real service process."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from rucher.authz import AuthzView
from rucher.bus import RucherError
from rucher.proto import iam
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import AclRecord, AclSubjectType, RealmRecord, RealmType
from rucher.pve import totp
from rucher.pve.roles import ALL_PRIVILEGES, BUILTIN_ROLES
from rucher.testing.nats import NatsServer

from .buses import connected, until
from .iam_service import start_iam, stop_iam, wait_ready

pytestmark = pytest.mark.integration

ADMIN = "admin@pve"
FAST_DELAY = "0.3"


@pytest.fixture(scope="module")
def iam_stack(tmp_path_factory):
    """One nats-server and one IAM service process for the whole module."""
    root = tmp_path_factory.mktemp("iam")
    server = NatsServer(name="nats-iam", store_dir=root / "store")
    server.start()
    server.wait_ready()
    process = start_iam(
        server.url,
        root / "state",
        RUCHER_LOGIN_FAILURE_DELAY=FAST_DELAY,
        RUCHER_LOGIN_THROTTLE_AFTER="2",
    )
    try:
        asyncio.run(wait_ready(server.url, process))
        yield server.url, root / "state"
    finally:
        stop_iam(process)
        server.stop()


@pytest.fixture
async def bus(iam_stack):
    async with connected(iam_stack[0], service="test-client") as client:
        yield client


@pytest.fixture
async def view(bus):
    authz = AuthzView(bus)
    await authz.start()
    yield authz
    await authz.stop()


def admin_password(iam_stack) -> str:
    return (iam_stack[1] / "admin-password").read_text().strip()


def cid() -> str:
    return uuid.uuid4().hex


def name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def call(bus, subject, **fields):
    message = (
        subject.payload(command_id=cid(), **fields)
        if "command_id" in (subject.payload.__struct_fields__)
        else subject.payload(**fields)
    )
    return await bus.request(subject.address, message, timeout=30.0)


async def refused(bus, subject, expected: ErrorCode, field: str | None = None, **fields):
    with pytest.raises(RucherError) as caught:
        await call(bus, subject, **fields)
    assert caught.value.code is expected, caught.value
    if field is not None:
        assert caught.value.details.get("field") == field, caught.value.details
    return caught.value


async def login(bus, username: str, password: str, **extra):
    return await call(bus, iam.LOGIN, username=username, password=password, **extra)


# Bootstrap and login ---------------------------------------------------------------------


async def test_bootstrap_makes_realms_root_and_an_administrator(bus, view, iam_stack):
    password_file = iam_stack[1] / "admin-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    domains = {d.realm: d.type for d in (await call(bus, iam.DOMAIN_LIST)).domains}
    assert domains["pam"] is RealmType.PAM and domains["pve"] is RealmType.PVE
    users = {u.userid for u in (await call(bus, iam.USER_LIST)).users}
    assert {"root@pam", ADMIN} <= users
    assert view.privileges(ADMIN, "/vms/100") == ALL_PRIVILEGES
    assert view.privileges("root@pam", "/") == ALL_PRIVILEGES


async def test_login_issues_a_ticket_and_csrf_token_every_instance_can_check(bus, view, iam_stack):
    granted = await login(bus, "admin", admin_password(iam_stack), realm="pve", source="10.0.0.1")
    assert granted.username == ADMIN and not granted.need_tfa
    assert granted.ticket.startswith("PVE:admin@pve:")
    assert view.verify_ticket(granted.ticket) == ADMIN
    view.verify_csrf(ADMIN, granted.csrf_token)
    assert granted.cap["nodes"]["Sys.PowerMgmt"] == 1
    with pytest.raises(RucherError) as bad:
        view.verify_csrf("root@pam", granted.csrf_token)
    assert bad.value.code is ErrorCode.UNAUTHENTICATED
    # Renewal: the current ticket as password.
    renewed = await login(bus, ADMIN, granted.ticket)
    assert view.verify_ticket(renewed.ticket) == ADMIN
    forged = granted.ticket[:-4] + "AAAA"
    await refused(bus, iam.LOGIN, ErrorCode.UNAUTHENTICATED, username=ADMIN, password=forged)


async def test_wrong_password_and_unknown_user_are_indistinguishable(bus):
    timings, errors = [], []
    for username in (ADMIN, "nobody@pve", "x@nosuchrealm", "not a user"):
        began = time.monotonic()
        error = await refused(
            bus, iam.LOGIN, ErrorCode.UNAUTHENTICATED, username=username, password="wrongpass1"
        )
        timings.append(time.monotonic() - began)
        errors.append((error.message, error.details))
    assert len(set(map(str, errors))) == 1, errors
    assert all(0.2 <= t < 1.5 for t in timings), timings


async def test_repeated_failures_from_one_source_are_slowed_further(bus):
    source = f"192.0.2.{uuid.uuid4().int % 250}"
    timings = []
    for _ in range(5):
        began = time.monotonic()
        await refused(
            bus, iam.LOGIN, ErrorCode.UNAUTHENTICATED, username=ADMIN, password="x", source=source
        )
        timings.append(time.monotonic() - began)
    # Two failures at the base delay, then +1 s, +2 s, +4 s.
    assert max(timings[:2]) < 0.8, timings
    assert timings[2] > 1.1 and timings[3] > 2.1 and timings[4] > 4.1, timings


async def test_disabled_and_expired_users_cannot_log_in_and_lose_their_tickets(bus, view):
    userid = f"{name('dis')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid, password="s3cret-pass")
    granted = await login(bus, userid, "s3cret-pass")
    await call(bus, iam.USER_UPDATE, actor=ADMIN, userid=userid, enable=False)
    await refused(
        bus, iam.LOGIN, ErrorCode.UNAUTHENTICATED, username=userid, password="s3cret-pass"
    )
    await until(lambda: not view.index.active(userid), timeout=2)
    with pytest.raises(RucherError):
        view.verify_ticket(granted.ticket)
    past = int(time.time()) - 5
    await call(bus, iam.USER_UPDATE, actor=ADMIN, userid=userid, enable=True, expire=past)
    await refused(
        bus, iam.LOGIN, ErrorCode.UNAUTHENTICATED, username=userid, password="s3cret-pass"
    )


# Users, passwords, groups ----------------------------------------------------------------


async def test_user_lifecycle(bus, view, iam_stack):
    group = name("grp")
    await call(bus, iam.GROUP_CREATE, actor=ADMIN, groupid=group, comment="team")
    userid = f"{name('alice')}@pve"
    await call(
        bus,
        iam.USER_CREATE,
        actor=ADMIN,
        userid=userid,
        password="first-pass",
        groups=(group,),
        email="a@example.com",
        firstname="Alice",
    )
    await refused(bus, iam.USER_CREATE, ErrorCode.EXISTS, "userid", actor=ADMIN, userid=userid)
    await refused(
        bus, iam.USER_CREATE, ErrorCode.INVALID, "userid", actor=ADMIN, userid="bob@nowhere"
    )
    await refused(
        bus,
        iam.USER_CREATE,
        ErrorCode.INVALID,
        "groups",
        actor=ADMIN,
        userid=f"{name('b')}@pve",
        groups=("no-such-group",),
    )
    await refused(
        bus,
        iam.USER_CREATE,
        ErrorCode.INVALID,
        "password",
        actor=ADMIN,
        userid=f"{name('c')}@pam",
        password="whatever-long",
    )
    await refused(
        bus,
        iam.USER_CREATE,
        ErrorCode.INVALID,
        "password",
        actor=ADMIN,
        userid=f"{name('d')}@pve",
        password="short",
    )
    listed = {u.userid: u for u in (await call(bus, iam.USER_LIST)).users}
    assert listed[userid].groups == (group,) and listed[userid].email == "a@example.com"
    assert listed[userid].realm_type is RealmType.PVE
    other = name("grp")
    await call(bus, iam.GROUP_CREATE, actor=ADMIN, groupid=other)
    await call(
        bus,
        iam.USER_UPDATE,
        actor=ADMIN,
        userid=userid,
        groups=(other,),
        append=True,
        comment="changed",
    )
    members = {g.groupid: g.members for g in (await call(bus, iam.GROUP_LIST)).groups}
    assert userid in members[group] and userid in members[other]
    await call(bus, iam.USER_UPDATE, actor=ADMIN, userid=userid, groups=(other,))
    members = {g.groupid: g.members for g in (await call(bus, iam.GROUP_LIST)).groups}
    assert userid not in members[group] and userid in members[other]
    await refused(
        bus,
        iam.USER_UPDATE,
        ErrorCode.NOT_FOUND,
        "userid",
        actor=ADMIN,
        userid="ghost@pve",
        comment="x",
    )
    # Password change, then the new password works and the old one does not. As in Proxmox,
    # everyone but root@pam confirms with their own current password.
    await refused(
        bus,
        iam.PASSWORD_CHANGE,
        ErrorCode.INVALID,
        "confirmation-password",
        actor=ADMIN,
        userid=userid,
        password="second-pass",
    )
    confirmed = {"actor": ADMIN, "confirmation_password": admin_password(iam_stack)}
    await call(bus, iam.PASSWORD_CHANGE, userid=userid, password="second-pass", **confirmed)
    await login(bus, userid, "second-pass")
    await refused(bus, iam.LOGIN, ErrorCode.UNAUTHENTICATED, username=userid, password="first-pass")
    await refused(
        bus,
        iam.PASSWORD_CHANGE,
        ErrorCode.INVALID,
        "password",
        userid=userid,
        password="tiny",
        **confirmed,
    )
    await refused(
        bus,
        iam.PASSWORD_CHANGE,
        ErrorCode.INVALID,
        "confirmation-password",
        actor=userid,
        userid=userid,
        password="third-pass1",
        confirmation_password="wrong-one",
    )
    await call(
        bus,
        iam.PASSWORD_CHANGE,
        actor=userid,
        userid=userid,
        password="third-pass1",
        confirmation_password="second-pass",
    )
    await call(bus, iam.PASSWORD_CHANGE, actor="root@pam", userid=userid, password="fourth-pass")
    await login(bus, userid, "fourth-pass")
    # Only root@pam changes root@pam's password, and pam passwords are the system's own.
    await refused(
        bus,
        iam.PASSWORD_CHANGE,
        ErrorCode.FORBIDDEN,
        "userid",
        userid="root@pam",
        password="whatever-long",
        **confirmed,
    )
    await refused(
        bus,
        iam.PASSWORD_CHANGE,
        ErrorCode.UNSUPPORTED,
        "userid",
        actor="root@pam",
        userid="root@pam",
        password="whatever-long",
    )
    # Deleting the group removes it from members; deleting the user removes its ACL entries.
    await call(
        bus, iam.ACL_UPDATE, actor=ADMIN, path="/vms", roles=("PVEAuditor",), users=(userid,)
    )
    await call(bus, iam.GROUP_DELETE, actor=ADMIN, groupid=other)
    await call(bus, iam.USER_DELETE, actor=ADMIN, userid=userid)
    entries = (await call(bus, iam.ACL_LIST)).entries
    assert not [e for e in entries if e.ugid == userid]
    assert userid not in {u.userid for u in (await call(bus, iam.USER_LIST)).users}
    await refused(bus, iam.USER_DELETE, ErrorCode.INVALID, "userid", actor=ADMIN, userid="root@pam")
    await refused(bus, iam.GROUP_DELETE, ErrorCode.NOT_FOUND, "groupid", actor=ADMIN, groupid=other)


# Roles and ACL ---------------------------------------------------------------------------


async def test_roles_and_acl(bus, view):
    role = name("role")
    await call(bus, iam.ROLE_CREATE, actor=ADMIN, roleid=role, privs=("VM.Audit", "VM.PowerMgmt"))
    await refused(
        bus,
        iam.ROLE_CREATE,
        ErrorCode.INVALID,
        "privs",
        actor=ADMIN,
        roleid=name("r"),
        privs=("VM.Monitor",),
    )
    await refused(bus, iam.ROLE_CREATE, ErrorCode.EXISTS, "roleid", actor=ADMIN, roleid="PVEAdmin")
    await refused(
        bus,
        iam.ROLE_UPDATE,
        ErrorCode.INVALID,
        "roleid",
        actor=ADMIN,
        roleid="PVEAdmin",
        privs=("VM.Audit",),
    )
    roles = {r.roleid: r for r in (await call(bus, iam.ROLE_LIST)).roles}
    assert roles["PVEVMAdmin"].special and set(roles["PVEVMAdmin"].privs) == set(
        BUILTIN_ROLES["PVEVMAdmin"]
    )
    assert not roles[role].special
    userid = f"{name('bob')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid)
    await call(bus, iam.ACL_UPDATE, actor=ADMIN, path="/vms/100", roles=(role,), users=(userid,))
    await until(lambda: view.allowed(userid, "/vms/100", ["VM.PowerMgmt"]), timeout=1)
    await call(bus, iam.ROLE_UPDATE, actor=ADMIN, roleid=role, privs=("VM.Console",), append=True)
    await until(lambda: view.allowed(userid, "/vms/100", ["VM.Console"]), timeout=1)
    entries = [e for e in (await call(bus, iam.ACL_LIST)).entries if e.ugid == userid]
    assert entries == [
        AclRecord(
            path="/vms/100", ugid=userid, type=AclSubjectType.USER, roleid=role, propagate=True
        )
    ]
    await call(
        bus,
        iam.ACL_UPDATE,
        actor=ADMIN,
        path="/vms/100",
        roles=(role,),
        users=(userid,),
        delete=True,
    )
    await until(lambda: not view.allowed(userid, "/vms/100", ["VM.Audit"]), timeout=1)
    await refused(
        bus,
        iam.ACL_UPDATE,
        ErrorCode.INVALID,
        "path",
        actor=ADMIN,
        path="/bogus",
        roles=(role,),
        users=(userid,),
    )
    await refused(
        bus,
        iam.ACL_UPDATE,
        ErrorCode.INVALID,
        "roles",
        actor=ADMIN,
        path="/",
        roles=("NoSuchRole",),
        users=(userid,),
    )
    await refused(
        bus,
        iam.ACL_UPDATE,
        ErrorCode.INVALID,
        "users",
        actor=ADMIN,
        path="/",
        roles=(role,),
        users=("ghost@pve",),
    )
    await refused(
        bus,
        iam.ACL_UPDATE,
        ErrorCode.INVALID,
        "groups",
        actor=ADMIN,
        path="/",
        roles=(role,),
        groups=("ghosts",),
    )
    # Deleting a role takes its grants with it.
    await call(bus, iam.ACL_UPDATE, actor=ADMIN, path="/", roles=(role,), users=(userid,))
    await call(bus, iam.ROLE_DELETE, actor=ADMIN, roleid=role)
    assert not [e for e in (await call(bus, iam.ACL_LIST)).entries if e.roleid == role]
    await refused(bus, iam.ROLE_DELETE, ErrorCode.INVALID, "roleid", actor=ADMIN, roleid="NoAccess")


# API tokens ------------------------------------------------------------------------------


async def test_tokens_with_privilege_separation(bus, view):
    userid = f"{name('ci')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid)
    await call(bus, iam.ACL_UPDATE, actor=ADMIN, path="/vms", roles=("PVEVMUser",), users=(userid,))
    created = await call(
        bus, iam.TOKEN_CREATE, actor=ADMIN, userid=userid, tokenid="deploy", comment="ci"
    )
    assert created.full_tokenid == f"{userid}!deploy" and created.info.privsep
    uuid.UUID(created.value)
    await refused(
        bus,
        iam.TOKEN_CREATE,
        ErrorCode.EXISTS,
        "tokenid",
        actor=ADMIN,
        userid=userid,
        tokenid="deploy",
    )
    await refused(
        bus,
        iam.TOKEN_CREATE,
        ErrorCode.NOT_FOUND,
        "userid",
        actor=ADMIN,
        userid="ghost@pve",
        tokenid="x",
    )
    header = f"PVEAPIToken={created.full_tokenid}={created.value}"
    await until(lambda: created.full_tokenid in view.index.tokens, timeout=1)
    assert view.verify_api_token(header) == created.full_tokenid
    with pytest.raises(RucherError):
        view.verify_api_token(f"PVEAPIToken={created.full_tokenid}={uuid.uuid4()}")
    # Separated and granted nothing: nothing. Granted Administrator: still only the user's.
    assert view.privileges(created.full_tokenid, "/vms/1") == frozenset()
    await call(
        bus,
        iam.ACL_UPDATE,
        actor=ADMIN,
        path="/",
        roles=("Administrator",),
        tokens=(created.full_tokenid,),
    )
    await until(lambda: bool(view.privileges(created.full_tokenid, "/vms/1")), timeout=1)
    assert view.privileges(created.full_tokenid, "/vms/1") == BUILTIN_ROLES["PVEVMUser"]
    assert not view.allowed(created.full_tokenid, "/", ["Sys.Audit"])
    await call(
        bus,
        iam.TOKEN_UPDATE,
        actor=ADMIN,
        userid=userid,
        tokenid="deploy",
        expire=int(time.time()) - 1,
    )
    await until(lambda: not view.index.active(created.full_tokenid), timeout=1)
    with pytest.raises(RucherError):
        view.verify_api_token(header)
    listed = (await call(bus, iam.TOKEN_LIST, userid=userid)).tokens
    assert [t.tokenid for t in listed] == [created.full_tokenid]
    full = {u.userid: u for u in (await call(bus, iam.USER_LIST, full=True)).users}
    assert [t.tokenid for t in full[userid].tokens] == [created.full_tokenid]
    await call(bus, iam.TOKEN_DELETE, actor=ADMIN, userid=userid, tokenid="deploy")
    assert not [
        e for e in (await call(bus, iam.ACL_LIST)).entries if e.ugid == created.full_tokenid
    ]
    await refused(
        bus,
        iam.TOKEN_DELETE,
        ErrorCode.NOT_FOUND,
        "tokenid",
        actor=ADMIN,
        userid=userid,
        tokenid="deploy",
    )


# Pools and realms ------------------------------------------------------------------------


async def test_pools(bus, view):
    first, second = name("pool"), name("pool")
    await call(bus, iam.POOL_CREATE, actor=ADMIN, poolid=first, comment="one")
    await call(bus, iam.POOL_CREATE, actor=ADMIN, poolid=second)
    await refused(bus, iam.POOL_CREATE, ErrorCode.EXISTS, "poolid", actor=ADMIN, poolid=first)
    await call(bus, iam.POOL_UPDATE, actor=ADMIN, poolid=first, vms=(101, 102), storage=("local",))
    await refused(
        bus, iam.POOL_UPDATE, ErrorCode.INVALID, "vms", actor=ADMIN, poolid=second, vms=(101,)
    )
    await call(bus, iam.POOL_UPDATE, actor=ADMIN, poolid=second, vms=(101,), allow_move=True)
    pools = {p.poolid: p for p in (await call(bus, iam.POOL_LIST)).pools}
    assert pools[first].vms == (102,) and pools[second].vms == (101,)
    # A role on the pool reaches its guests.
    userid = f"{name('pooler')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid)
    await call(
        bus,
        iam.ACL_UPDATE,
        actor=ADMIN,
        path=f"/pool/{first}",
        roles=("PVEVMUser",),
        users=(userid,),
    )
    await until(lambda: view.allowed(userid, "/vms/102", ["VM.PowerMgmt"]), timeout=1)
    assert not view.allowed(userid, "/vms/101", ["VM.PowerMgmt"])
    await refused(bus, iam.POOL_DELETE, ErrorCode.INVALID, "poolid", actor=ADMIN, poolid=first)
    await call(
        bus, iam.POOL_UPDATE, actor=ADMIN, poolid=first, vms=(102,), storage=("local",), delete=True
    )
    await call(bus, iam.POOL_DELETE, actor=ADMIN, poolid=first)
    assert not [e for e in (await call(bus, iam.ACL_LIST)).entries if e.path == f"/pool/{first}"]
    await refused(bus, iam.POOL_DELETE, ErrorCode.NOT_FOUND, "poolid", actor=ADMIN, poolid=first)


async def test_domains(bus):
    realm = name("oidc")
    config = RealmRecord(
        realm=realm,
        type=RealmType.OPENID,
        issuer_url="https://idp.example",
        client_id="rucher",
        client_key="s3cret",
    )
    await call(bus, iam.DOMAIN_CREATE, actor=ADMIN, config=config)
    await refused(bus, iam.DOMAIN_CREATE, ErrorCode.EXISTS, "realm", actor=ADMIN, config=config)
    bad = RealmRecord(realm=name("o"), type=RealmType.OPENID, issuer_url="ftp://x", client_id="c")
    await refused(bus, iam.DOMAIN_CREATE, ErrorCode.INVALID, "issuer-url", actor=ADMIN, config=bad)
    await refused(
        bus,
        iam.DOMAIN_CREATE,
        ErrorCode.INVALID,
        "type",
        actor=ADMIN,
        config=RealmRecord(realm=name("p"), type=RealmType.PVE),
    )
    await call(
        bus,
        iam.DOMAIN_UPDATE,
        actor=ADMIN,
        realm=realm,
        changes={"comment": "corp", "autocreate": True},
        delete=("client_key",),
    )
    domains = {d.realm: d for d in (await call(bus, iam.DOMAIN_LIST)).domains}
    assert domains[realm].comment == "corp" and domains[realm].autocreate
    assert not hasattr(domains[realm], "client_key")
    await refused(
        bus,
        iam.DOMAIN_UPDATE,
        ErrorCode.INVALID,
        "autocreate",
        actor=ADMIN,
        realm=realm,
        changes={"autocreate": "yes"},
    )
    await refused(
        bus,
        iam.DOMAIN_UPDATE,
        ErrorCode.INVALID,
        "issuer-url",
        actor=ADMIN,
        realm="pam",
        changes={"issuer_url": "https://x"},
    )
    await refused(bus, iam.DOMAIN_DELETE, ErrorCode.INVALID, "realm", actor=ADMIN, realm="pve")
    await call(bus, iam.DOMAIN_DELETE, actor=ADMIN, realm=realm)
    await refused(bus, iam.DOMAIN_DELETE, ErrorCode.NOT_FOUND, "realm", actor=ADMIN, realm=realm)


# Second factor ---------------------------------------------------------------------------


async def test_totp_second_factor(bus, view):
    userid = f"{name('tfa')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid, password="tfa-password")
    spec = totp.TotpSpec(secret=totp.new_secret())
    uri = totp.make_uri(spec, userid)
    await refused(
        bus,
        iam.TFA_ADD,
        ErrorCode.INVALID,
        "value",
        actor=userid,
        userid=userid,
        password="tfa-password",
        totp=uri,
        value="000000" if totp.code_now(spec, time.time()) != "000000" else "1",
    )
    await refused(
        bus,
        iam.TFA_ADD,
        ErrorCode.INVALID,
        "totp",
        actor=userid,
        userid=userid,
        password="tfa-password",
        totp="otpauth://totp/x",
        value="123456",
    )
    added = await call(
        bus,
        iam.TFA_ADD,
        actor=userid,
        userid=userid,
        password="tfa-password",
        totp=uri,
        value=totp.code_now(spec, time.time()),
        description="phone",
    )
    listed = (await call(bus, iam.TFA_LIST, userid=userid)).entries
    assert [(e.id, e.description) for e in listed] == [(added.id, "phone")]
    # The old style: the code with the password (a wrong code is refused).
    step = int(time.time()) // 30
    wrong = str((int(totp.code_at(spec, step)) + 1) % 10**6).zfill(6)
    await refused(
        bus,
        iam.LOGIN,
        ErrorCode.UNAUTHENTICATED,
        username=userid,
        password="tfa-password",
        otp=wrong,
    )
    direct = await login(bus, userid, "tfa-password", otp=totp.code_at(spec, step))
    assert not direct.need_tfa and view.verify_ticket(direct.ticket) == userid
    # The password alone now yields a TFA challenge, not a ticket.
    challenge = await login(bus, userid, "tfa-password")
    assert challenge.need_tfa and not challenge.csrf_token
    with pytest.raises(RucherError):
        view.verify_ticket(challenge.ticket)
    code = totp.code_at(spec, step + 1)  # the next step's code has not been used yet
    granted = await login(bus, userid, f"totp:{code}", tfa_challenge=challenge.ticket)
    assert view.verify_ticket(granted.ticket) == userid
    # The same code twice is refused, as is a challenge for someone else.
    await refused(
        bus,
        iam.LOGIN,
        ErrorCode.UNAUTHENTICATED,
        username=userid,
        password=f"totp:{code}",
        tfa_challenge=challenge.ticket,
    )
    await refused(
        bus,
        iam.LOGIN,
        ErrorCode.UNAUTHENTICATED,
        username=ADMIN,
        password=f"totp:{totp.code_now(spec, time.time())}",
        tfa_challenge=challenge.ticket,
    )
    # ... and the old style, the code with the password.
    await refused(bus, iam.TFA_VERIFY, ErrorCode.UNAUTHENTICATED, userid=userid, code=code)
    removal = {"actor": userid, "userid": userid, "id": added.id, "password": "tfa-password"}
    await call(bus, iam.TFA_DELETE, **removal)
    await refused(bus, iam.TFA_DELETE, ErrorCode.NOT_FOUND, "id", **removal)
    plain = await login(bus, userid, "tfa-password")
    assert not plain.need_tfa and view.verify_ticket(plain.ticket) == userid


async def test_adding_or_removing_a_second_factor_needs_the_actors_password(bus, iam_stack):
    # Regression: adding and deleting skipped Proxmox's re-authentication, so a stolen ticket
    # alone could enrol the thief's authenticator for a victim or remove the victim's factor.
    userid = f"{name('tfa')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid, password="tfa-password")
    spec = totp.TotpSpec(secret=totp.new_secret())

    def factor(**fields):
        uri = totp.make_uri(spec, userid)
        return {"totp": uri, "value": totp.code_now(spec, time.time()), **fields}

    mine = {"actor": userid, "userid": userid}
    admin = {"actor": ADMIN, "password": admin_password(iam_stack)}
    await refused(bus, iam.TFA_ADD, ErrorCode.INVALID, "password", **factor(**mine))
    for wrong in (
        {**mine, "password": "wrong-password"},
        # The target user's password does not confirm an administrator's change.
        {"actor": ADMIN, "userid": userid, "password": "tfa-password"},
    ):
        await refused(bus, iam.TFA_ADD, ErrorCode.INVALID, "password", **factor(**wrong))
    await refused(
        bus, iam.TFA_ADD, ErrorCode.FORBIDDEN, "userid", **factor(userid="root@pam", **admin)
    )
    await refused(
        bus, iam.TFA_ADD, ErrorCode.NOT_FOUND, "userid", **factor(userid="nobody@pve", **admin)
    )
    assert (await call(bus, iam.TFA_LIST, userid=userid)).entries == ()

    # The user with their own password, an administrator with theirs, root@pam with none.
    ids = [
        (await call(bus, iam.TFA_ADD, **factor(**fields))).id
        for fields in (
            {**mine, "password": "tfa-password"},
            {"userid": userid, **admin},
            {"actor": "root@pam", "userid": userid},
        )
    ]
    listed = (await call(bus, iam.TFA_LIST, userid=userid)).entries
    assert [e.id for e in listed] == ids

    first = {**mine, "id": ids[0]}
    await refused(bus, iam.TFA_DELETE, ErrorCode.INVALID, "password", **first)
    await refused(
        bus, iam.TFA_DELETE, ErrorCode.INVALID, "password", password="wrong-password", **first
    )
    await refused(
        bus, iam.TFA_DELETE, ErrorCode.FORBIDDEN, "userid", userid="root@pam", id=ids[0], **admin
    )
    listed = (await call(bus, iam.TFA_LIST, userid=userid)).entries
    assert [e.id for e in listed] == ids

    await call(bus, iam.TFA_DELETE, password="tfa-password", **first)
    await call(bus, iam.TFA_DELETE, userid=userid, id=ids[1], **admin)
    await call(bus, iam.TFA_DELETE, actor="root@pam", userid=userid, id=ids[2])
    assert (await call(bus, iam.TFA_LIST, userid=userid)).entries == ()


async def test_updating_a_second_factor(bus, view, iam_stack):
    userid = f"{name('tfa')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid, password="tfa-password")
    spec = totp.TotpSpec(secret=totp.new_secret())
    added = await call(
        bus,
        iam.TFA_ADD,
        actor=userid,
        userid=userid,
        password="tfa-password",
        totp=totp.make_uri(spec, userid),
        value=totp.code_now(spec, time.time()),
        description="phone",
    )
    factor = {"userid": userid, "id": added.id}
    # Everyone but root@pam confirms with their own current password.
    await refused(bus, iam.TFA_UPDATE, ErrorCode.INVALID, "password", actor=userid, **factor)
    await refused(
        bus,
        iam.TFA_UPDATE,
        ErrorCode.INVALID,
        "password",
        actor=userid,
        enable=False,
        password="wrong-password",
        **factor,
    )
    await refused(
        bus,
        iam.TFA_UPDATE,
        ErrorCode.NOT_FOUND,
        "id",
        actor=userid,
        userid=userid,
        id="nosuch",
        password="tfa-password",
    )
    await refused(
        bus,
        iam.TFA_UPDATE,
        ErrorCode.NOT_FOUND,
        "userid",
        actor=ADMIN,
        userid="nobody@pve",
        id=added.id,
        password=admin_password(iam_stack),
    )
    await refused(
        bus,
        iam.TFA_UPDATE,
        ErrorCode.FORBIDDEN,
        "userid",
        actor=ADMIN,
        userid="root@pam",
        id=added.id,
        password=admin_password(iam_stack),
    )
    listed = (await call(bus, iam.TFA_LIST, userid=userid)).entries
    assert [(e.description, e.enable) for e in listed] == [("phone", True)]

    step = int(time.time()) // 30
    pending = await login(bus, userid, "tfa-password")
    assert pending.need_tfa
    await call(bus, iam.TFA_UPDATE, actor=userid, enable=False, password="tfa-password", **factor)
    listed = (await call(bus, iam.TFA_LIST, userid=userid)).entries
    assert [(e.description, e.enable) for e in listed] == [("phone", False)]
    users = {u.userid: u for u in (await call(bus, iam.USER_LIST)).users}
    assert users[userid].tfa == ()
    # Disabled: the password alone is a ticket, and the factor's codes are refused everywhere.
    plain = await login(bus, userid, "tfa-password")
    assert not plain.need_tfa and view.verify_ticket(plain.ticket) == userid
    code = totp.code_at(spec, step + 1)
    await refused(
        bus,
        iam.LOGIN,
        ErrorCode.UNAUTHENTICATED,
        username=userid,
        password=f"totp:{code}",
        tfa_challenge=pending.ticket,
    )
    await refused(bus, iam.TFA_VERIFY, ErrorCode.UNAUTHENTICATED, userid=userid, code=code)

    # An administrator confirms with their own password; root@pam needs none.
    await call(
        bus,
        iam.TFA_UPDATE,
        actor=ADMIN,
        description="old phone",
        password=admin_password(iam_stack),
        **factor,
    )
    await call(bus, iam.TFA_UPDATE, actor="root@pam", enable=True, **factor)
    listed = (await call(bus, iam.TFA_LIST, userid=userid)).entries
    assert [(e.description, e.enable) for e in listed] == [("old phone", True)]
    challenge = await login(bus, userid, "tfa-password")
    assert challenge.need_tfa
    granted = await login(bus, userid, f"totp:{code}", tfa_challenge=challenge.ticket)
    assert view.verify_ticket(granted.ticket) == userid

    # Each change is a security event on evt.iam.* and its copy on audit.iam.*, without secrets.
    audited = await bus.js.get_last_msg("AUDIT", "audit.iam.user_changed.n1")
    event = await bus.js.get_last_msg("EVENTS", "evt.iam.user_changed.n1")
    assert audited.data == event.data
    assert userid.encode() in event.data and b'"actor":"root@pam"' in event.data
    assert b'"fields":["tfa"]' in event.data and b"tfa-password" not in event.data


async def test_concurrent_second_factor_updates_all_land(bus):
    userid = f"{name('tfa')}@pve"
    await call(bus, iam.USER_CREATE, actor=ADMIN, userid=userid, password="tfa-password")
    spec = totp.TotpSpec(secret=totp.new_secret())
    ids = [
        (
            await call(
                bus,
                iam.TFA_ADD,
                actor=userid,
                userid=userid,
                password="tfa-password",
                totp=totp.make_uri(spec, userid),
                value=totp.code_now(spec, time.time()),
            )
        ).id
        for _ in range(4)
    ]
    # Compare-and-set on the user's record: no update overwrites another one's factor.
    await asyncio.gather(
        *(
            call(
                bus,
                iam.TFA_UPDATE,
                actor="root@pam",
                userid=userid,
                id=factor,
                description=f"key {n}",
                enable=n % 2 == 0,
            )
            for n, factor in enumerate(ids)
        )
    )
    listed = (await call(bus, iam.TFA_LIST, userid=userid)).entries
    assert [(e.id, e.description, e.enable) for e in listed] == [
        (factor, f"key {n}", n % 2 == 0) for n, factor in enumerate(ids)
    ]


# The audit trail -------------------------------------------------------------------------


async def test_security_events_reach_the_audit_stream(bus):
    await refused(bus, iam.LOGIN, ErrorCode.UNAUTHENTICATED, username=ADMIN, password="wrongpass1")
    groupid = name("audited")
    await call(bus, iam.GROUP_CREATE, actor=ADMIN, groupid=groupid)
    message = await bus.js.get_last_msg("AUDIT", "audit.iam.group_changed.n1")
    assert groupid.encode() in message.data and b'"actor":"admin@pve"' in message.data
    info = await bus.js.stream_info("AUDIT")
    assert info.state.messages >= 1
    assert info.config.subjects == ["audit.>"]
    failed = await bus.js.get_last_msg("AUDIT", "audit.iam.login_failed.n1")
    assert b'"reason":"bad_credentials"' in failed.data and b"wrongpass1" not in failed.data
    events = await bus.js.get_last_msg("EVENTS", "evt.iam.group_changed.n1")
    assert events.data == message.data
