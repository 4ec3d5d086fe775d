"""The one-node dev stack (ops/up, ops/down) for real, on free ports and a temporary state dir."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rucher.testing.nats import free_port
from rucher.testing.process import is_same_process_alive

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# A stand-in service for a fake checkout: records its environment, exits on SIGTERM.
STAND_IN = """
import json, os, pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
state = pathlib.Path(os.environ["RUCHER_STATE_DIR"])
state.mkdir(parents=True, exist_ok=True)
env = {k: v for k, v in os.environ.items() if k.startswith("RUCHER_")}
(state / "env.json").write_text(json.dumps(env))
time.sleep(600)
"""


def stack_env(state: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("RUCHER_")},
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_NODE": "devtest",
        "RUCHER_NATS_PORT": str(free_port()),
        "RUCHER_NATS_MONITOR_PORT": str(free_port()),
        "RUCHER_GATEWAY_PORT": str(free_port()),
        "RUCHER_UP_TIMEOUT": "20",
        **extra,
    }


def run(argv: list[str | Path], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=90)


def status(state: Path) -> dict:
    return json.loads((state / "run" / "status.json").read_text())


def healthy(env: dict[str, str]) -> bool:
    url = f"http://127.0.0.1:{env['RUCHER_NATS_MONITOR_PORT']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def gateway_answers(env: dict[str, str]) -> tuple[int, object]:
    """The status and body of an unauthenticated GET /version, once the gateway listens."""
    url = f"https://127.0.0.1:{env['RUCHER_GATEWAY_PORT']}/api2/json/version"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, context=context, timeout=2)
        except urllib.error.HTTPError as answer:
            return answer.code, json.loads(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        else:
            raise AssertionError("GET /version answered without credentials")


@pytest.fixture
def stopped_afterwards():
    """Environments to bring down at the end of the test, whatever happened."""
    envs: list[tuple[dict[str, str], Path]] = []
    yield lambda env, root=ROOT: envs.append((env, root))
    for env, root in envs:
        module = [sys.executable, "-m", "rucher.testing.stack"]
        run([*module, "down", "--root", str(root)], env)


def test_ops_up_twice_then_down_then_purge(tmp_path, stopped_afterwards):
    state = tmp_path / "state"
    env = stack_env(state)
    stopped_afterwards(env)

    first = run([ROOT / "ops" / "up"], env)

    assert first.returncode == 0, first.stdout + first.stderr
    assert f"nats://127.0.0.1:{env['RUCHER_NATS_PORT']}" in first.stdout
    assert f"state:    {state}" in first.stdout
    assert f"logs:     {state / 'logs'}" in first.stdout
    assert f"https://127.0.0.1:{env['RUCHER_GATEWAY_PORT']}/api2/json" in first.stdout
    assert healthy(env)
    # The gateway listens where the stack says, not on the default 8006: without credentials
    # the Proxmox API answers 401 with its JSON envelope.
    assert gateway_answers(env) == (401, {"data": None})
    supervisor = status(state)["supervisor_pid"]
    nats = status(state)["children"]["nats"]["pid"]

    again = run([ROOT / "ops" / "up"], env)

    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and "nothing changed" in again.stdout
    assert status(state)["supervisor_pid"] == supervisor
    assert status(state)["children"]["nats"]["pid"] == nats
    assert (state / "logs" / "nats.log").exists()
    assert (state / "logs" / "supervisor.log").exists()

    down = run([ROOT / "ops" / "down", "--reboot"], env)

    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    # The HA service took the stop for a reboot, and the flag counted once.
    going_down = [
        json.loads(line)
        for line in (state / "logs" / "ha.log").read_text().splitlines()
        if '"ha_node_going_down"' in line
    ]
    assert [event["kind"] for event in going_down] == ["reboot"]
    assert not (state / "data" / "ha" / "ha-reboot").exists()
    assert not is_same_process_alive(supervisor, None)
    assert not is_same_process_alive(nats, None)
    assert not healthy(env)
    assert (state / "nats").is_dir()  # data stays without --purge

    purge = run([ROOT / "ops" / "down", "--purge"], env)

    assert purge.returncode == 0, purge.stderr
    assert "not running" in purge.stdout
    assert not state.exists()


def fake_checkout(root: Path) -> Path:
    package = root / "services" / "standin" / "rucher" / "standin"
    package.mkdir(parents=True)
    (package / "__main__.py").write_text(STAND_IN)
    return root / "services" / "standin"


def test_stack_supervises_every_service_in_the_tree(tmp_path, stopped_afterwards):
    root, state = tmp_path / "checkout", tmp_path / "state"
    service_dir = fake_checkout(root)
    env = stack_env(state, PYTHONPATH=str(service_dir))
    stopped_afterwards(env, root)
    stack = [sys.executable, "-m", "rucher.testing.stack"]

    up = run([*stack, "up", "--root", str(root)], env)

    assert up.returncode == 0, up.stdout + up.stderr
    assert "services: standin" in up.stdout
    recorded = json.loads((state / "data" / "standin" / "env.json").read_text())
    assert (
        recorded.items()
        >= {
            "RUCHER_NATS_URL": f"nats://127.0.0.1:{env['RUCHER_NATS_PORT']}",
            "RUCHER_NODE": "devtest",
            "RUCHER_STATE_DIR": str(state / "data" / "standin"),
            "RUCHER_LOG_FORMAT": "json",
        }.items()
    )
    first = status(state)["children"]["standin"]["pid"]

    os.kill(first, 9)  # a crash: the supervisor starts it again

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        child = status(state)["children"]["standin"]
        if child["state"] == "running" and child["pid"] not in {None, first}:
            break
        time.sleep(0.1)
    assert child["restarts"] == 1
    log = (state / "logs" / "supervisor.log").read_text().splitlines()
    assert any(json.loads(line)["event"] == "child_exited" for line in log)

    assert run([*stack, "down", "--root", str(root)], env).returncode == 0
    assert not is_same_process_alive(child["pid"], None)


def test_up_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = stack_env(tmp_path / "state", RUCHER_NATS_PORT=str(busy.getsockname()[1]))

        result = run([sys.executable, "-m", "rucher.testing.stack", "up", "--root", str(ROOT)], env)

    assert result.returncode == 1
    assert "port in use" in result.stderr
    assert "RUCHER_NATS_PORT" in result.stderr


def test_up_fails_clearly_when_a_service_cannot_start_and_leaves_nothing_running(
    tmp_path, stopped_afterwards
):
    root, state = tmp_path / "checkout", tmp_path / "state"
    package = root / "services" / "broken" / "rucher" / "broken"
    package.mkdir(parents=True)
    (package / "__main__.py").write_text("raise SystemExit('broken: missing setting')\n")
    env = stack_env(state, PYTHONPATH=str(root / "services" / "broken"), RUCHER_UP_TIMEOUT="60")
    stopped_afterwards(env, root)
    started = time.monotonic()

    result = run([sys.executable, "-m", "rucher.testing.stack", "up", "--root", str(root)], env)

    assert result.returncode == 1
    assert time.monotonic() - started < 15  # recognised as a crash loop, not waited out
    assert "crash loop" in result.stderr
    assert "broken: missing setting" in result.stderr
    assert "did not start" in result.stderr
    assert not (state / "run" / "supervisor.pid").exists()
    assert not healthy(env)
