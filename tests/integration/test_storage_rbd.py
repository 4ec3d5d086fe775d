"""The single-node Ceph behind ``ops/ceph`` and the ``rbd`` storage built on it."""

from __future__ import annotations

import importlib
import json
import time

import pytest

pytest_plugins = ["rucher.testing.ceph"]  # the session's one Ceph: the ceph_cluster fixture
pytestmark = pytest.mark.integration


def connect(settings: dict[str, str], user: str = "admin"):
    rados = importlib.import_module("rados")
    cluster = rados.Rados(rados_id=user, conffile=None, conf=settings)
    cluster.connect(timeout=10)
    return cluster


def test_the_cluster_stores_objects_for_a_client_holding_only_the_monitor_and_key(ceph_cluster):
    cluster = connect(ceph_cluster.client_settings())
    try:
        with cluster.open_ioctx(ceph_cluster.pool) as ioctx:
            ioctx.write_full("probe", b"rucher")
            assert ioctx.read("probe") == b"rucher"
            ioctx.remove_object("probe")
        _, out, _ = cluster.mon_command(
            json.dumps({"prefix": "osd pool get", "pool": "rbd", "var": "size", "format": "json"}),
            b"",
        )
        assert json.loads(out)["size"] == 1
    finally:
        cluster.shutdown()


def test_cephx_refuses_a_wrong_key(ceph_cluster):
    rados = importlib.import_module("rados")
    forged = {
        **ceph_cluster.client_settings(),
        "key": "AQBvaHNl" + "A" * 30 + "==",
        "client_mount_timeout": "3",
    }
    with pytest.raises((rados.PermissionDeniedError, rados.Error)):
        connect(forged)


@pytest.mark.slow
def test_a_cluster_starts_from_an_empty_folder_in_seconds_and_stops_osd_first(tmp_path):
    from rucher.testing.ceph import CephCluster, ceph_unavailable

    reason = ceph_unavailable()
    if reason is not None:
        pytest.skip(f"Ceph unavailable: {reason}")
    cluster = CephCluster(tmp_path / "ceph")
    started = time.monotonic()
    cluster.start()
    try:
        assert time.monotonic() - started < 30
        assert cluster.running
        again = CephCluster.load(tmp_path / "ceph")
        assert again.running and again.monhost == cluster.monhost
    finally:
        stopping = time.monotonic()
        cluster.stop()
    assert time.monotonic() - stopping < 5  # the OSD went first, so nothing stalled
    assert not any(process.alive for process in cluster.processes.values())
