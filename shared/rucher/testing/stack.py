"""The one-node dev stack behind ``ops/up`` and ``ops/down``: nats-server plus every service.

``python -m rucher.testing.stack up|down [--purge]|status|run``. ``up`` starts ``run`` (the
supervisor) in the background and returns once every child is ready; running it again while the
stack is up changes nothing. Settings come from the environment (``RUCHER_STATE_DIR``,
``RUCHER_NODE``, ``RUCHER_NATS_HOST``, ``RUCHER_NATS_PORT``, ``RUCHER_NATS_MONITOR_PORT``,
``RUCHER_GATEWAY_HOST``, ``RUCHER_GATEWAY_PORT``) so tests can run a second stack on other ports.
"""

# ruff: noqa: T201 - a command-line tool: printing is how it answers.

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from rucher.haconfig import REBOOT_FLAG
from rucher.testing.nats import NatsServer
from rucher.testing.process import ManagedProcess, is_same_process_alive, tail
from rucher.testing.supervisor import Child, Supervisor

CHECKOUT = Path(__file__).resolve().parents[3]
STATE_MARKER = ".rucher-state"
UP_TIMEOUT = 60.0
CRASH_LOOP = 3
GATEWAY_SERVICE = "gateway"


def discover_services(root: Path) -> list[str]:
    """Services that exist in the tree: those with ``services/<name>/rucher/<name>/__main__.py``."""
    services = root / "services"
    if not services.is_dir():
        return []
    return sorted(
        entry.name
        for entry in services.iterdir()
        if (entry / "rucher" / entry.name / "__main__.py").is_file()
    )


@dataclass(frozen=True)
class StackSettings:
    """Where the stack keeps its state and which ports it listens on."""

    root: Path
    state_dir: Path
    node: str
    nats_host: str = "127.0.0.1"
    nats_port: int = 4222
    monitor_port: int = 8222
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8006

    @classmethod
    def from_env(cls, root: Path, environ: Mapping[str, str] = os.environ) -> StackSettings:
        """Read the settings from ``environ``; by default ``<root>/.state``, ports 4222/8222."""
        state = Path(environ.get("RUCHER_STATE_DIR") or root / ".state")
        return cls(
            root=root,
            state_dir=state if state.is_absolute() else root / state,
            node=environ.get("RUCHER_NODE") or socket.gethostname().split(".")[0],
            nats_host=environ.get("RUCHER_NATS_HOST", "127.0.0.1"),
            nats_port=int(environ.get("RUCHER_NATS_PORT", "4222")),
            monitor_port=int(environ.get("RUCHER_NATS_MONITOR_PORT", "8222")),
            gateway_host=environ.get("RUCHER_GATEWAY_HOST", "127.0.0.1"),
            gateway_port=int(environ.get("RUCHER_GATEWAY_PORT", "8006")),
        )

    @property
    def log_dir(self) -> Path:
        """One log file per child, plus the supervisor's own."""
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        """Pid file, status file and lock."""
        return self.state_dir / "run"

    @property
    def pid_file(self) -> Path:
        """The supervisor's pid."""
        return self.run_dir / "supervisor.pid"

    @property
    def status_file(self) -> Path:
        """The supervisor's JSON status (children, pids, readiness)."""
        return self.run_dir / "status.json"

    @property
    def nats_url(self) -> str:
        """Where clients connect."""
        return f"nats://{self.nats_host}:{self.nats_port}"

    @property
    def monitor_url(self) -> str:
        """nats-server's monitoring endpoint (``/healthz``, ``/jsz``)."""
        return f"http://{self.nats_host}:{self.monitor_port}"

    @property
    def gateway_url(self) -> str:
        """Where the gateway serves the Proxmox-compatible API."""
        return f"https://{self.gateway_host}:{self.gateway_port}/api2/json"

    def service_state(self, service: str) -> Path:
        """The state folder of one service."""
        return self.state_dir / "data" / service

    def service_env(self, service: str) -> dict[str, str]:
        """The environment every service process gets (the gateway also its listen address)."""
        env = {
            "RUCHER_NATS_URL": self.nats_url,
            "RUCHER_NODE": self.node,
            "RUCHER_STATE_DIR": str(self.service_state(service)),
            "RUCHER_LOG_FORMAT": "json",
        }
        if service == GATEWAY_SERVICE:
            env["RUCHER_GATEWAY_LISTEN"] = f"{self.gateway_host}:{self.gateway_port}"
        return env


def nats_server(settings: StackSettings) -> NatsServer:
    """The stack's single nats-server with JetStream."""
    return NatsServer(
        name=f"rucher-{settings.node}",
        store_dir=settings.state_dir / "nats",
        host=settings.nats_host,
        client_port=settings.nats_port,
        monitor_port=settings.monitor_port,
        log_file=settings.log_dir / "nats.log",
    )


def build_children(settings: StackSettings) -> list[Child]:
    """nats-server first (ready on ``/healthz``), then one child per service in the tree."""
    nats = nats_server(settings)
    children = [
        Child(
            ManagedProcess("nats", nats.command(), settings.log_dir / "nats.log"),
            ready=lambda: nats.healthz(js_only=True) and nats.healthz(),
        )
    ]
    for service in discover_services(settings.root):
        argv = [sys.executable, "-m", f"rucher.{service}"]
        log_file = settings.log_dir / f"{service}.log"
        children.append(
            Child(ManagedProcess(service, argv, log_file, settings.service_env(service)))
        )
    return children


def describe(settings: StackSettings) -> dict[str, Any]:
    """What ``up`` prints and the status file repeats."""
    services = discover_services(settings.root)
    return {
        "node": settings.node,
        "nats_url": settings.nats_url,
        "monitor_url": settings.monitor_url,
        "gateway_url": settings.gateway_url if GATEWAY_SERVICE in services else None,
        "services": services,
        "state_dir": str(settings.state_dir),
        "log_dir": str(settings.log_dir),
    }


def run(settings: StackSettings) -> int:
    """Supervise the stack in the foreground until SIGTERM."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )
    supervisor = Supervisor(
        build_children(settings),
        pid_file=settings.pid_file,
        status_file=settings.status_file,
        extra_status=describe(settings),
    )
    return supervisor.run()


def _read_status(settings: StackSettings) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(settings.status_file.read_text())
    except (OSError, ValueError):
        return {}
    return data


def running_supervisor(settings: StackSettings) -> int | None:
    """The pid of this state folder's supervisor, if one runs."""
    try:
        pid = int(settings.pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    # A stale pid file may name a pid since reused by something else.
    if b"rucher.testing.stack" not in cmdline or not is_same_process_alive(pid, None):
        return None
    return pid


@contextlib.contextmanager
def _locked(settings: StackSettings) -> Iterator[None]:
    """Serialise up/down on one state folder."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with (settings.run_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _print_info(info: dict[str, Any], headline: str) -> None:
    services = ", ".join(info["services"]) or "none yet (no services/<name>/ in the tree)"
    gateway = info["gateway_url"] or "not started (services/gateway does not exist yet)"
    print(headline)
    print(f"  NATS:     {info['nats_url']}  (monitor {info['monitor_url']}/healthz)")
    print(f"  gateway:  {gateway}")
    print(f"  services: {services}")
    print(f"  state:    {info['state_dir']}")
    print(f"  logs:     {info['log_dir']}")


def _wait_ready(settings: StackSettings, supervisor: int, timeout: float) -> dict[str, Any]:
    """Wait for the supervisor's status file to report every child ready.

    Gives up early when a child is crash-looping: one that restarted ``CRASH_LOOP`` times
    without ever becoming ready will not become ready by waiting longer.
    """
    deadline = time.monotonic() + timeout
    reason = f"not ready after {timeout:.0f} s"
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = _read_status(settings)
        if status.get("supervisor_pid") == supervisor and status.get("ready"):
            return status
        if not is_same_process_alive(supervisor, None):
            log = tail(settings.log_dir / "supervisor.log")
            raise RuntimeError(f"the supervisor exited:\n{log}")
        children = status.get("children", {}).values()
        if any(c["restarts"] >= CRASH_LOOP and not c["was_ready"] for c in children):
            reason = "a crash loop"
            break
        time.sleep(0.1)
    waiting = {
        name: child
        for name, child in status.get("children", {}).items()
        if child.get("state") != "running"
    }
    details = "\n".join(
        f"--- {name} ({child.get('state')}, {child.get('restarts')} restarts): "
        f"{child.get('log_file')}\n{tail(Path(child.get('log_file', '')))}"
        for name, child in waiting.items()
    )
    raise RuntimeError(f"{reason}:\n{details}")


def up(settings: StackSettings, timeout: float = UP_TIMEOUT) -> int:
    """Start the stack in the background unless it already runs; return once it is ready."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / STATE_MARKER).touch()
    with _locked(settings):
        supervisor = running_supervisor(settings)
        if supervisor is not None:
            try:
                status = _wait_ready(settings, supervisor, timeout)
            except RuntimeError as err:
                print(f"ops/up: Rucher runs but is not ready: {err}", file=sys.stderr)
                return 1
            headline = f"Rucher is already running (supervisor pid {supervisor}): nothing changed."
            _print_info(status, headline)
            return 0
        # A supervisor that was SIGKILLed leaves its children running: clear them first.
        _stop(settings)
        busy = [
            f"{settings.nats_host}:{port} ({variable})"
            for port, variable in [
                (settings.nats_port, "RUCHER_NATS_PORT"),
                (settings.monitor_port, "RUCHER_NATS_MONITOR_PORT"),
            ]
            if _port_in_use(settings.nats_host, port)
        ]
        if busy:
            hint = "stop what holds it or set the variable"
            print(f"ops/up: port in use: {', '.join(busy)}; {hint}", file=sys.stderr)
            return 1
        settings.status_file.unlink(missing_ok=True)
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "RUCHER_STATE_DIR": str(settings.state_dir),
            "RUCHER_NODE": settings.node,
        }
        with (settings.log_dir / "supervisor.log").open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "rucher.testing.stack", "run", "--root", str(settings.root)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            status = _wait_ready(settings, process.pid, timeout)
        except RuntimeError as err:
            print(f"ops/up: the stack did not start: {err}", file=sys.stderr)
            _stop(settings, supervisor=process.pid)
            return 1
        _print_info(status, f"Rucher is up (node {settings.node}, supervisor pid {process.pid}).")
        return 0


def _stop(settings: StackSettings, timeout: float = 30.0, supervisor: int | None = None) -> bool:
    """Stop the supervisor (SIGTERM, then SIGKILL) and anything it left; whether one ran.

    ``supervisor`` names one just started, which may not have written its pid file yet.
    """
    supervisor = supervisor or running_supervisor(settings)
    if supervisor is not None:
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_same_process_alive(supervisor, None) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_same_process_alive(supervisor, None):
            print(f"ops/down: supervisor {supervisor} ignored SIGTERM; killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(supervisor, signal.SIGKILL)
    # Children run in their own sessions: after a supervisor crash or SIGKILL they live on.
    for name, child in _read_status(settings).get("children", {}).items():
        pid, ticks = child.get("pid"), child.get("start_ticks")
        if pid and is_same_process_alive(pid, ticks):
            print(f"ops/down: killing leftover {name} (pid {pid})", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    settings.pid_file.unlink(missing_ok=True)
    return supervisor is not None


def down(settings: StackSettings, *, purge: bool = False, reboot: bool = False) -> int:
    """Stop the stack; with ``purge`` remove its state folder as well.

    With ``reboot`` the node is about to reboot: the HA service applies the shutdown policy's
    reboot branch (``conditional`` freezes the HA guests instead of moving them away).
    """
    if reboot and running_supervisor(settings) is not None:
        flag = settings.service_state("ha") / REBOOT_FLAG
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.touch()
    if settings.state_dir.exists():
        with _locked(settings):
            stopped = _stop(settings)
        print("Rucher stopped." if stopped else "Rucher was not running.")
    else:
        print("Rucher was not running (no state folder).")
    if purge and settings.state_dir.exists():
        if not (settings.state_dir / STATE_MARKER).exists():
            refusal = f"{settings.state_dir} has no {STATE_MARKER} marker; not removing it"
            print(f"ops/down: {refusal}", file=sys.stderr)
            return 1
        shutil.rmtree(settings.state_dir)
        print(f"Removed {settings.state_dir}.")
    return 0


def status(settings: StackSettings) -> int:
    """Print the stack's state; 0 when it runs and is ready."""
    supervisor = running_supervisor(settings)
    if supervisor is None:
        print("Rucher is not running.")
        return 3
    current = _read_status(settings)
    _print_info(current or describe(settings), f"Rucher supervisor pid {supervisor}:")
    for name, child in current.get("children", {}).items():
        print(f"  {name:<10}{child['state']:<10}pid {child['pid']}  restarts {child['restarts']}")
    return 0 if current.get("ready") else 1


def main(argv: list[str] | None = None) -> int:
    """Command line: ``up``, ``down [--purge]``, ``status``, ``run``."""
    parser = argparse.ArgumentParser(prog="rucher.testing.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "run"])
    parser.add_argument("--root", type=Path, default=CHECKOUT, help="the checkout")
    parser.add_argument("--purge", action="store_true", help="down: remove the state folder")
    parser.add_argument("--reboot", action="store_true", help="down: the node reboots (HA)")
    args = parser.parse_args(argv)
    settings = StackSettings.from_env(args.root.resolve())
    if args.command == "up":
        return up(settings, float(os.environ.get("RUCHER_UP_TIMEOUT", UP_TIMEOUT)))
    if args.command == "down":
        return down(settings, purge=args.purge, reboot=args.reboot)
    if args.command == "status":
        return status(settings)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
