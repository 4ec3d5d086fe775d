"""Owned processes and the dev-stack supervisor, with stand-in children (no NATS)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rucher.testing.process import ManagedProcess, is_same_process_alive, process_start_ticks
from rucher.testing.stack import StackSettings, build_children, discover_services
from rucher.testing.supervisor import Child, Supervisor

# Starts a grandchild (same process group), prints its pid, then sleeps.
PARENT = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen(['sleep', '600']); print(child.pid, flush=True); time.sleep(600)"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_kill_takes_the_whole_process_group(tmp_path):
    process = ManagedProcess("parent", python(PARENT), tmp_path / "parent.log")
    process.start()
    wait_for(lambda: process.tail_log().strip().isdigit())
    grandchild = int(process.tail_log())

    process.kill()

    assert not process.alive
    wait_for(lambda: not is_same_process_alive(grandchild, None))


def test_what_a_dead_leader_leaves_behind_is_killed_when_noticed(tmp_path):
    process = ManagedProcess("parent", python(PARENT), tmp_path / "parent.log")
    process.start()
    wait_for(lambda: process.tail_log().strip().isdigit())
    grandchild = int(process.tail_log())

    os.kill(process.pid, signal.SIGKILL)  # only the leader dies
    wait_for(lambda: not process.alive)

    wait_for(lambda: not is_same_process_alive(grandchild, None))


def test_stop_asks_nicely_first(tmp_path):
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('bye', flush=True), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    process = ManagedProcess("polite", python(code), tmp_path / "polite.log", {"X": "1"})
    process.start()
    wait_for(lambda: "up" in process.tail_log())

    process.stop(timeout=5)

    assert process.returncode == 0
    assert process.tail_log().split() == ["up", "bye"]


def test_a_process_found_again_by_pid_is_checked_against_its_start_time(tmp_path):
    process = ManagedProcess("sleeper", ["sleep", "600"], tmp_path / "sleeper.log")
    process.start()
    try:
        found = ManagedProcess.from_dict(json.loads(json.dumps(process.to_dict())))
        impostor = ManagedProcess.from_dict({**process.to_dict(), "start_ticks": 1})

        assert found.alive
        assert found.start_ticks == process_start_ticks(process.pid)
        assert not impostor.alive  # a reused pid is not our process
        found.kill()
        wait_for(lambda: not process.alive)
    finally:
        process.kill()


def run_supervisor(supervisor: Supervisor, seconds: float) -> None:
    """Run the supervisor in this (main) thread and ask it to stop after ``seconds``."""
    timer = threading.Timer(seconds, supervisor.request_stop)
    timer.start()
    try:
        assert supervisor.run() == 0
    finally:
        timer.cancel()


def test_supervisor_restarts_crashed_children_with_backoff_and_stops_the_rest(tmp_path):
    steady = ManagedProcess("steady", ["sleep", "600"], tmp_path / "logs" / "steady.log")
    crasher = ManagedProcess(
        "crasher", python("print('crash', flush=True); raise SystemExit(3)"), tmp_path / "c.log"
    )
    supervisor = Supervisor(
        [Child(steady, settle=0.1), Child(crasher, settle=0.5)],
        pid_file=tmp_path / "run" / "supervisor.pid",
        status_file=tmp_path / "run" / "status.json",
        initial_backoff=0.1,
        max_backoff=0.4,
        start_timeout=0.5,
    )

    run_supervisor(supervisor, 2.5)

    status = json.loads((tmp_path / "run" / "status.json").read_text())
    crashes = crasher.tail_log(100).split()
    # Backoff 0.1, 0.2, 0.4, 0.4... within ~2 s of running: a handful of restarts, not hundreds.
    assert 3 <= status["children"]["crasher"]["restarts"] <= 8
    assert len(crashes) == status["children"]["crasher"]["restarts"] + 1
    assert status["children"]["steady"]["restarts"] == 0
    assert {child["state"] for child in status["children"].values()} == {"stopped"}
    assert not steady.alive
    assert not status["ready"]
    assert not (tmp_path / "run" / "supervisor.pid").exists()


def test_supervisor_reports_ready_once_every_child_is(tmp_path):
    ready_file = tmp_path / "ready"
    children = [
        Child(ManagedProcess("a", ["sleep", "600"], tmp_path / "a.log"), ready=ready_file.exists),
        Child(ManagedProcess("b", ["sleep", "600"], tmp_path / "b.log"), settle=0.1),
    ]
    supervisor = Supervisor(
        children,
        pid_file=tmp_path / "supervisor.pid",
        status_file=tmp_path / "status.json",
        extra_status={"node": "n1"},
        start_timeout=0.3,
    )
    seen: list[dict] = []

    def watch() -> None:
        for _ in range(40):
            if (tmp_path / "status.json").exists():
                seen.append(json.loads((tmp_path / "status.json").read_text()))
            if len(seen) == 5:
                ready_file.touch()
            time.sleep(0.05)
        supervisor.request_stop()

    watcher = threading.Thread(target=watch)
    watcher.start()
    supervisor.run()
    watcher.join()

    assert not seen[0]["ready"]
    assert seen[0]["supervisor_pid"] == os.getpid()
    assert any(status["ready"] for status in seen)
    assert all(status["node"] == "n1" for status in seen)


def test_services_are_found_in_the_tree_and_started_after_nats(tmp_path):
    for name in ["compute", "gateway"]:
        (tmp_path / "services" / name / "rucher" / name).mkdir(parents=True)
        (tmp_path / "services" / name / "rucher" / name / "__main__.py").write_text("")
    (tmp_path / "services" / "notes").mkdir()  # not a service: no module
    settings = StackSettings.from_env(
        tmp_path, {"RUCHER_STATE_DIR": "st", "RUCHER_NODE": "pve1", "RUCHER_NATS_PORT": "4333"}
    )

    children = build_children(settings)

    assert discover_services(tmp_path) == ["compute", "gateway"]
    assert [child.name for child in children] == ["nats", "compute", "gateway"]
    compute = children[1].process
    assert compute.argv == [sys.executable, "-m", "rucher.compute"]
    assert compute.log_file == tmp_path / "st" / "logs" / "compute.log"
    assert compute.env == {
        "RUCHER_NATS_URL": "nats://127.0.0.1:4333",
        "RUCHER_NODE": "pve1",
        "RUCHER_STATE_DIR": str(tmp_path / "st" / "data" / "compute"),
        "RUCHER_LOG_FORMAT": "json",
    }
    assert "-js" in children[0].process.argv
    assert str(tmp_path / "st" / "nats") in children[0].process.argv


def test_default_settings():
    settings = StackSettings.from_env(Path("/checkout"), {})

    assert settings.state_dir == Path("/checkout/.state")
    assert settings.log_dir == Path("/checkout/.state/logs")
    assert (settings.nats_url, settings.monitor_url) == (
        "nats://127.0.0.1:4222",
        "http://127.0.0.1:8222",
    )
    assert settings.gateway_url == "https://127.0.0.1:8006/api2/json"
