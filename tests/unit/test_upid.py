"""Proxmox UPIDs: format, parse, and uniqueness within one process."""

from __future__ import annotations

import pytest

from rucher.tasks.upid import Upid, UpidMinter

# Shapes taken from Proxmox task lists (qmstart, vzdump with an empty id, a token user).
PROXMOX = [
    "UPID:pve1:0002A1B3:01C3D4E5:65A1B2C3:qmstart:100:root@pam:",
    "UPID:node-2:00001234:1ABCDEF01:65A1B2C3:vzdump::root@pam:",  # 9-digit pstart
    "UPID:pve1:0002A1B3:01C3D4E5:65A1B2C3:qmigrate:101:alice@pve!ci:",
]


@pytest.mark.parametrize("text", PROXMOX)
def test_proxmox_upids_parse_and_format_back(text):
    upid = Upid.parse(text)
    assert str(upid) == text


def test_fields_are_read_as_proxmox_defines_them():
    upid = Upid.parse(PROXMOX[0])
    assert (upid.node, upid.pid, upid.pstart, upid.starttime) == (
        "pve1",
        0x2A1B3,
        0x1C3D4E5,
        0x65A1B2C3,
    )
    assert (upid.type, upid.id, upid.user) == ("qmstart", "100", "root@pam")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "UPID:pve1:0002A1B3:01C3D4E5:65A1B2C3:qmstart:100:root@pam",  # no trailing colon
        "UPID:pve1:2A1B3:01C3D4E5:65A1B2C3:qmstart:100:root@pam:",  # pid not 8 hex digits
        "UPID:-bad:0002A1B3:01C3D4E5:65A1B2C3:qmstart:100:root@pam:",
        "PID:pve1:0002A1B3:01C3D4E5:65A1B2C3:qmstart:100:root@pam:",
    ],
)
def test_malformed_upids_are_refused(bad):
    with pytest.raises(ValueError, match="unable to parse worker upid"):
        Upid.parse(bad)


def test_a_minter_never_repeats_itself_within_a_second():
    minter = UpidMinter("n1")
    upids = {str(minter.mint("qmstart", "100", "root@pam")) for _ in range(10_000)}
    assert len(upids) == 10_000
    assert all(Upid.parse(u).node == "n1" for u in list(upids)[:10])


@pytest.mark.parametrize(
    ("field", "value"), [("task_type", "a:b"), ("task_id", "1 2"), ("user", "x:y")]
)
def test_fields_that_would_break_the_format_are_refused(field, value):
    args = {"task_type": "qmstart", "task_id": "100", "user": "root@pam", field: value}
    with pytest.raises(ValueError, match="may not hold"):
        UpidMinter("n1").mint(**args)
