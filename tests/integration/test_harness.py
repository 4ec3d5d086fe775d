"""The multi-node harness: one JetStream cluster across namespaces, a node crash, a network cut."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from rucher.testing.harness import Harness
from rucher.testing.harness_node import NATS_CLIENT_PORT, Node
from rucher.testing.netns import links, namespaces, netns_pids

pytestmark = pytest.mark.slow

# Bounds below are generous on purpose: nats-server's Raft elections take 4-9 s here (measured:
# an R3 KV write resumes 4.8-9.6 s after SIGKILL of the stream leader), and this is a shared,
# noisy machine. The tests check what happens, not how fast.

ROOT = Path(__file__).resolve().parents[2]

# A stand-in service: records its RUCHER_* environment, then starts two children, one of which
# leaves the process group (as a daemonising libvirtd or dnsmasq would), and sleeps.
SERVICE = """
import json, os, pathlib, subprocess, time
state = pathlib.Path(os.environ["RUCHER_STATE_DIR"])
state.mkdir(parents=True, exist_ok=True)
env = {k: v for k, v in os.environ.items() if k.startswith("RUCHER_")}
subprocess.Popen(["sleep", "600"])
subprocess.Popen(["setsid", "sleep", "601"])
(state / "env.json").write_text(json.dumps(env))
time.sleep(600)
"""


@asynccontextmanager
async def client(node: Node) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    """A client of one node only (no fail-over to the others)."""
    connection = await nats.connect(
        node.url, connect_timeout=2, allow_reconnect=False, dont_randomize=True
    )
    try:
        yield connection, connection.jetstream(timeout=5)
    finally:
        await connection.close()


async def eventually(check: Callable[[], object], timeout: float, what: str) -> None:
    """Retry ``check`` (sync or async) until it returns truthy without raising."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        except Exception as err:  # retried until the deadline, then reported
            last = err
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s (last error: {last!r})")


async def first_publish(js: JetStreamContext, subject: str, payload: bytes) -> PubAck:
    """Publish to a stream just created: until its subjects' interest has crossed the routes
    to the client's server, a publish may get "no responders"."""
    acks: list[PubAck] = []

    async def publish() -> bool:
        acks.append(await js.publish(subject, payload))
        return True

    await eventually(publish, 5, f"the first publish to {subject}")
    return acks[-1]


def reachable(node: Node) -> bool:
    """Whether the node's NATS port answers from the root namespace."""
    try:
        with socket.create_connection((node.address, NATS_CLIENT_PORT), timeout=1):
            return True
    except OSError:
        return False


def start_stand_in_service(node: Node) -> Path:
    env_file = node.state_dir / "data" / "stand-in" / "env.json"
    node.start_service("stand-in", [sys.executable, "-c", SERVICE], ready=env_file.exists)
    return env_file


async def test_nodes_form_one_jetstream_cluster_in_their_own_namespaces(harness_factory):
    harness: Harness = harness_factory(3)
    n1, n2, n3 = harness.nodes

    assert [node.name for node in harness.nodes] == ["n1", "n2", "n3"]
    assert {n.namespace for n in harness.nodes} <= namespaces()
    assert len({n.address for n in harness.nodes}) == 3
    assert all(node.nats.wrap == ["ip", "netns", "exec", node.namespace] for node in harness.nodes)

    async with client(n1) as (_, js1), client(n2) as (_, js2):
        await js1.add_stream(name="HARNESS", subjects=["harness.>"], num_replicas=3)
        ack = await first_publish(js1, "harness.hello", b"from n1")
        info = await js2.stream_info("HARNESS")
        message = await js2.get_msg("HARNESS", ack.seq)

    assert message.data == b"from n1"
    assert info.state.messages == 1
    peers = {info.cluster.leader, *(replica.name for replica in info.cluster.replicas)}
    assert peers == {"n1", "n2", "n3"}
    assert harness.jsz(n3)["meta_cluster"]["cluster_size"] == 3


async def test_killed_node_leaves_a_healthy_cluster_that_still_writes_r3(harness_factory):
    harness: Harness = harness_factory(3)
    async with client(harness.node("n1")) as (_, js):
        kv = await js.create_key_value(bucket="harness", replicas=3)
        await eventually(lambda: kv.put("before", b"1"), 5, "the first KV write")
        leader = (await js.stream_info("KV_harness")).cluster.leader
    # Crash the node leading the bucket: the worst case for the survivors.
    victim = harness.node(leader)
    survivor = next(node for node in harness.nodes if node is not victim)
    env_file = start_stand_in_service(victim)
    environment = json.loads(env_file.read_text())
    assert environment["RUCHER_NODE"] == victim.name
    assert environment["RUCHER_NATS_URL"].split(",")[0] == victim.url
    assert len(netns_pids(victim.namespace)) >= 4  # nats, the service and its two children

    started = time.monotonic()
    harness.kill(victim)

    assert not any(process.alive for process in victim.processes.values())
    assert netns_pids(victim.namespace) == []  # the setsid child too
    assert not reachable(victim)
    for node in harness.nodes:
        if node is not victim:
            await eventually(node.nats_ready, 20, f"{node.name} healthy after the kill")
    async with client(survivor) as (connection, _):
        js = connection.jetstream(timeout=1)  # short: each try during the fail-over may time out

        async def put_after() -> int:
            bucket = await js.key_value("harness")  # reads stream info: fails until a new leader
            return await bucket.put("after", b"2")

        await eventually(put_after, 30, "an R3 KV write after the kill")
        failover = time.monotonic() - started

        async def both_keys() -> bool:
            bucket = await js.key_value("harness")
            before, after = await bucket.get("before"), await bucket.get("after")
            return before.value == b"1" and after.value == b"2"

        await eventually(both_keys, 10, "both keys readable after the kill")
    print(f"R3 KV write accepted {failover:.2f} s after SIGKILL of the leader")

    harness.restart(victim)  # same store: it rejoins and catches up
    harness.wait_cluster_whole()
    assert env_file.exists() and victim.processes["stand-in"].alive
    async with client(victim) as (_, js):

        async def read_after() -> bool:
            bucket = await js.key_value("harness")
            return (await bucket.get("after")).value == b"2"

        await eventually(read_after, 20, "the restarted node serving the new key")


async def test_cut_node_is_unreachable_then_heals_into_a_whole_cluster(harness_factory):
    harness: Harness = harness_factory(3)
    n1, n2, _ = harness.nodes
    async with client(n1) as (_, js):
        await js.add_stream(name="CUT", subjects=["cut.>"], num_replicas=3)
        await first_publish(js, "cut.before", b"1")

    harness.cut(n2)

    assert not reachable(n2)
    assert not n2.nats_ready()
    assert n2.processes["nats"].alive  # cut, not killed
    assert not harness.cluster_whole()
    async with client(n1) as (_, js):
        # Two of three replicas are a quorum: writes go on while n2 is away.
        await eventually(lambda: js.publish("cut.during", b"2"), 30, "a write during the cut")

    harness.heal(n2)

    assert reachable(n2)
    harness.wait_cluster_whole()

    async def stream_whole() -> bool:
        async with client(n2) as (_, js):
            info = await js.stream_info("CUT")
        replicas = info.cluster.replicas or []
        return (
            info.state.messages == 2
            and len(replicas) == 2
            and all(r.current and not r.offline for r in replicas)
        )

    await eventually(stream_whole, 30, "the stream's three replicas current again")


async def test_stopped_harness_leaves_nothing_behind(harness_factory):
    harness: Harness = harness_factory(3)  # two nodes can take seconds to elect a meta leader
    names = {harness.bridge, *(node.host_veth for node in harness.nodes)}
    spaces = {node.namespace for node in harness.nodes}
    pids = [p.pid for node in harness.nodes for p in node.processes.values()]
    harness.cut("n1")

    harness.stop()

    assert not names & links()
    assert not spaces & namespaces()
    assert not harness.registry_file.exists()
    assert all(_gone(pid) for pid in pids)
    harness.stop()  # twice is harmless


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def ops_harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ROOT / "ops" / "harness", *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_ops_harness_command_line(tmp_path):
    up = ops_harness("up", "3")
    assert up.returncode == 0, up.stderr
    run_id = up.stdout.split()[1].rstrip(":")
    try:
        assert f"ops/harness --run {run_id} down" in up.stdout
        harness = Harness.load(run_id)
        n1, n2, _ = harness.nodes
        assert reachable(n1) and reachable(n2)

        killed = ops_harness("--run", run_id, "kill", "n2")
        assert killed.returncode == 0, killed.stderr
        assert not reachable(n2)
        assert " n2   down " in killed.stdout

        assert ops_harness("--run", run_id, "restart", "n2").returncode == 0
        assert reachable(n2)

        cut = ops_harness("--run", run_id, "cut", "n1")
        assert " n1   cut " in cut.stdout
        assert not reachable(n1)
        assert ops_harness("--run", run_id, "heal", "n1").returncode == 0
        assert reachable(n1)
        Harness.load(run_id).wait_cluster_whole()

        status = ops_harness("status")
        assert run_id in status.stdout
    finally:
        down = ops_harness("--run", run_id, "down")
    assert down.returncode == 0, down.stderr
    assert not {node.namespace for node in harness.nodes} & namespaces()
    assert harness.bridge not in links()


def test_ops_harness_leaves_runs_of_live_test_sessions_alone(harness_factory):
    harness: Harness = harness_factory(1)

    refused = ops_harness("--run", harness.run_id, "down")

    assert refused.returncode != 0
    assert "belongs to process" in refused.stderr
    assert harness.node("n1").nats_ready()
    assert harness.run_id in ops_harness("status").stdout
