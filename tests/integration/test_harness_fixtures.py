"""The pytest fixtures: real servers on private ports, shared or not, cleaned up after failures."""

from __future__ import annotations

import json
from pathlib import Path

import nats
import pytest

from rucher.testing.nats import NatsCluster, NatsServer
from rucher.testing.netns import links, namespaces
from rucher.testing.process import is_same_process_alive

pytestmark = pytest.mark.integration

seen_module_servers: list[NatsServer] = []


async def test_nats_server_runs_jetstream_on_a_private_port(nats_server, tmp_path):
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert nats_server.client_port != 4222  # never the dev stack's default
    assert nats_server.store_dir.is_relative_to(tmp_path)
    connection = await nats.connect(nats_server.url)
    try:
        js = connection.jetstream()
        await js.add_stream(name="FIXTURE", subjects=["fixture"])
        assert (await js.publish("fixture", b"x")).seq == 1
    finally:
        await connection.close()


@pytest.mark.parametrize("attempt", [1, 2])
def test_nats_server_module_is_one_server_per_module(nats_server_module, attempt):
    seen_module_servers.append(nats_server_module)

    assert nats_server_module.healthz()
    assert all(server is nats_server_module for server in seen_module_servers)
    assert len(seen_module_servers) == attempt


async def test_nats_cluster_is_one_jetstream_cluster_of_three(nats_cluster: NatsCluster):
    assert len(nats_cluster.urls) == 3
    first = await nats.connect(nats_cluster.urls[0])
    last = await nats.connect(nats_cluster.urls[2])
    try:
        await first.jetstream().add_stream(name="R3", subjects=["r3"], num_replicas=3)
        info = await last.jetstream().stream_info("R3")
    finally:
        await first.close()
        await last.close()
    assert len(info.cluster.replicas) == 2


INNER = """
import json, pathlib
import pytest

def test_fails_while_servers_run(nats_server, nats_cluster, {harness}):
    record = {{"pids": [nats_server.process.pid] + [s.process.pid for s in nats_cluster.servers]}}
    {build}
    pathlib.Path({out!r}).write_text(json.dumps(record))
    assert False, "deliberate failure"
"""


@pytest.mark.slow
def test_fixtures_clean_up_after_a_failed_test_and_show_the_logs(pytester, tmp_path):
    out = tmp_path / "record.json"
    pytester.makepyfile(
        INNER.format(
            out=str(out),
            harness="harness_factory",
            build=(
                "h = harness_factory(2); record['netns'] = [n.namespace for n in h.nodes]; "
                "record['bridge'] = h.bridge; record['pids'] += [n.processes['nats'].pid "
                "for n in h.nodes]"
            ),
        )
    )

    result = pytester.runpytest_subprocess(
        "-p", "rucher.testing.pytest_plugin", "-p", "no:cacheprovider"
    )

    result.assert_outcomes(failed=1)
    record = json.loads(out.read_text())
    assert not any(is_same_process_alive(pid, None) for pid in record["pids"])
    assert not set(record["netns"]) & namespaces()
    assert record["bridge"] not in links()
    output = result.stdout.str()
    assert "Captured nats_server nats-test.log teardown" in output
    assert "harness" in output and "n1/nats.log" in output
    assert "Server is ready" in output


def test_the_plugin_is_loaded_from_conftest(request):
    plugin = request.config.pluginmanager.get_plugin("rucher.testing.pytest_plugin")
    assert plugin is not None
    assert Path(plugin.__file__).name == "pytest_plugin.py"
