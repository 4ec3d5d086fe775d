"""Cloud-init NoCloud seeds from Proxmox's ci* options, compared with golden files.

Regenerate after a deliberate change: RUCHER_UPDATE_GOLDEN=1 pytest on this file
(tests/unit/golden/cloudinit/<case>/<file>).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from rucher.compute.cloudinit import (
    SEED_FILES,
    CloudInitError,
    cloudinit_drive,
    is_cloudinit_key,
    seed_files,
    sha512_crypt,
)

GOLDEN = Path(__file__).parent / "golden" / "cloudinit"
MAC = "virtio=BC:24:11:12:34:56,bridge=vmbr0"

CASES: dict[str, tuple[int, dict[str, str]]] = {
    "dhcp-user-keys": (
        200,
        {
            "name": "web01", "ciuser": "debian", "cipassword": "$5$salt$hash",
            "sshkeys": "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIJ%20me%40laptop%0A"
                       "ssh-rsa%20AAAAB3NzaC1yc2EAAAADAQABAAABAQ%20ops%40ci%0A",
            "ipconfig0": "ip=dhcp", "net0": MAC, "ide2": "local:cloudinit",
        },
    ),
    "static-dual-stack": (
        201,
        {
            "ipconfig0": "ip=192.0.2.10/24,gw=192.0.2.1,ip6=2001:db8::10/64,gw6=2001:db8::1",
            "ipconfig1": "ip6=auto", "net0": MAC, "net1": "e1000=BC:24:11:65:43:21,bridge=vmbr1",
            "nameserver": "192.0.2.53 2001:db8::53", "searchdomain": "example.com corp.example",
            "ciupgrade": "0", "ide2": "local:vm-201-cloudinit,media=cdrom",
        },
    ),
    "nothing-set": (202, {"ide2": "local:cloudinit"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_seed_matches_golden(name):
    vmid, config = CASES[name]
    files = seed_files(vmid, config)
    assert sorted(files) == sorted(SEED_FILES)
    folder = GOLDEN / name
    if os.environ.get("RUCHER_UPDATE_GOLDEN"):
        folder.mkdir(parents=True, exist_ok=True)
        for file, text in files.items():
            (folder / file).write_text(text)
    for file, text in files.items():
        assert text == (folder / file).read_text(), file


def test_the_instance_id_changes_with_the_seed():
    vmid, config = CASES["dhcp-user-keys"]
    first = seed_files(vmid, config)["meta-data"]
    again = seed_files(vmid, config)["meta-data"]
    changed = seed_files(vmid, {**config, "ciuser": "admin"})["meta-data"]
    assert first == again
    assert first != changed


def test_the_drive_and_keys_are_recognised():
    assert cloudinit_drive({"ide2": "local:cloudinit"}) == "ide2"
    assert cloudinit_drive({"scsi1": "ceph:vm-100-cloudinit,media=cdrom"}) == "scsi1"
    assert cloudinit_drive({"ide2": "local:iso/debian.iso,media=cdrom"}) is None
    assert is_cloudinit_key("ipconfig7")
    assert is_cloudinit_key("sshkeys")
    assert not is_cloudinit_key("ipconfig")


def test_a_bad_key_names_its_field():
    with pytest.raises(CloudInitError) as caught:
        seed_files(100, {"ipconfig0": "ip=dhcp,mtu=9000", "net0": MAC})
    assert caught.value.field == "ipconfig0"


@pytest.mark.parametrize(
    ("password", "salt"),
    [("correct horse", "abcdefgh12345678"), ("x", "ab"), ("p" * 100, "0123456789abcdef"),
     ("é€", "Zz./09")],
)  # fmt: skip
def test_sha512_crypt_matches_the_c_library(password, salt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # deprecated: only the reference here
    assert sha512_crypt(password, salt) == crypt.crypt(password, f"$6${salt}")


def test_a_plain_password_is_hashed_and_a_hash_kept():
    plain = seed_files(300, {"cipassword": "hunter22"})["user-data"]
    assert "hunter22" not in plain
    assert 'password: "$6$' in plain
    assert plain == seed_files(300, {"cipassword": "hunter22"})["user-data"]  # stable
    assert plain != seed_files(301, {"cipassword": "hunter22"})["user-data"]  # salted per VM
    hashed = seed_files(300, {"cipassword": "$5$salt$hash"})["user-data"]
    assert 'password: "$5$salt$hash"' in hashed
