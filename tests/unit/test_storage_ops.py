"""ops/ceph and the Ceph test cluster's files, without starting any daemon."""

from __future__ import annotations

import base64
import os
import stat
import struct
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UBUNTU = 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nVERSION_ID="22.04"\nID=ubuntu\n'


def test_ops_ceph_is_strict_executable_bash():
    path = ROOT / "ops" / "ceph"
    text = path.read_text()

    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert path.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", path], check=False).returncode == 0


def test_ops_ceph_checks_the_system_first(tmp_path):
    os_release = tmp_path / "os-release"
    os_release.write_text(UBUNTU)

    result = subprocess.run(
        [ROOT / "ops" / "ceph", "up"],
        env={**os.environ, "RUCHER_OS_RELEASE": str(os_release)},
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 1
    assert "support Debian 12 (bookworm) only" in result.stderr


def test_ops_ceph_refuses_an_unknown_command():
    result = subprocess.run(
        [ROOT / "ops" / "ceph", "explode"], capture_output=True, text=True, check=False
    )

    assert result.returncode == 1
    assert "unknown command: explode" in result.stderr


def test_a_new_key_has_the_cephx_secret_layout():
    from rucher.testing.ceph import new_key  # the rbd tests load this module as a plugin

    raw = base64.b64decode(new_key())

    kind, _seconds, _nanos, length = struct.unpack("<HIIH", raw[:12])
    assert (kind, length, len(raw)) == (1, 16, 28)
    assert new_key() != new_key()


def test_a_keyring_section_names_the_entity_key_and_caps():
    from rucher.testing.ceph import keyring_text

    text = keyring_text("client.admin", "KEY==", {"mon": "allow *"})

    assert text == '[client.admin]\n\tkey = KEY==\n\tcaps mon = "allow *"\n'


def test_every_path_of_a_cluster_stays_inside_its_folder(tmp_path):
    from rucher.testing.ceph import CephCluster

    cluster = CephCluster(tmp_path / "c", host="10.1.2.1", mon_port=3301, fsid="f")
    cluster.root.mkdir()
    cluster._write_conf()

    conf = cluster.conf.read_text()
    paths = [line.split(" = ")[1] for line in conf.splitlines() if " = /" in line]
    assert paths and all(path.startswith(str(cluster.root)) for path in paths)
    assert "mon host = [v2:10.1.2.1:3301]" in conf
    assert "public addr = 10.1.2.1" in conf
    assert "osd objectstore = memstore" in conf
    assert "auth client required = cephx" in conf
