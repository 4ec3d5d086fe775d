"""A single-node Ceph cluster (one monitor, one manager, one memstore OSD) for tests and ops.

``CephCluster(root, host).start()`` builds a cluster from an empty folder in a few seconds: cephx
on, pool size 1, the shortened timers measured in PLATFORM-NOTES.md, every path (data, sockets,
logs) inside ``root`` so several clusters can run side by side. The manager is what makes pool
usage (``ceph df``) available; RBD itself works without it. ``stop`` ends the OSD first (else it
stalls on shutdown), then the manager, then the monitor. The cluster is described in
``root/cluster.json`` so ``python -m rucher.testing.ceph up|down|status`` (behind ``ops/ceph``)
can act on it from another process; ``up --follow PIDFILE`` binds the cluster's life to the
process that file names (the dev stack's supervisor: ``ops/down`` then stops Ceph too). The
``ceph_cluster`` pytest fixture runs one per session.
"""

# ruff: noqa: T201 - a command-line tool: printing is how it answers.

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rucher.testing.nats import free_port
from rucher.testing.process import ManagedProcess, is_same_process_alive, process_start_ticks

DAEMONS = ("ceph-mon", "ceph-osd", "ceph-mgr", "monmaptool", "ceph", "rados")
PACKAGES = "ceph-mon ceph-osd ceph-mgr python3-rados python3-rbd"
READY_TIMEOUT = 60.0
COMMAND_TIMEOUT = 30.0
STATE_FILE = "cluster.json"
FOLLOWER_FILE = "follower.pid"
FOLLOW_PATIENCE = 120.0
ADMIN = "client.admin"
MEMSTORE_BYTES = 1 << 30

# The settings that make a one-node cluster usable in seconds (PLATFORM-NOTES.md, Ceph).
FAST_SETTINGS = {
    "osd objectstore": "memstore",
    "osd pool default size": "1",
    "osd pool default min size": "1",
    "osd pool default pg num": "8",
    "osd pool default pgp num": "8",
    "osd pool default pg autoscale mode": "off",
    "mon allow pool size one": "true",
    "mon allow pool delete": "true",
    "mon warn on pool no redundancy": "false",
    "mon data avail crit": "1",
    "osd crush chooseleaf type": "0",
    "paxos propose interval": "0.05",
    "paxos min wait": "0.01",
    "osd mon report interval": "1",
    "osd heartbeat interval": "1",
    "mgr tick period": "1",
    "mgr stats period": "1",
    "auth allow insecure global id reclaim": "false",
}


def ceph_unavailable() -> str | None:
    """Why a cluster cannot run here (missing programs or Python bindings), or None."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (ops/install installs {PACKAGES})"
    bindings = [name for name in ("rados", "rbd") if importlib.util.find_spec(name) is None]
    if bindings:
        return (
            f"the {' and '.join(bindings)} Python modules are not on this interpreter's path "
            "(ops/ceph install exposes Debian's python3-rados/python3-rbd in .venv)"
        )
    return None


def new_key() -> str:
    """A fresh cephx secret, as ``ceph-authtool --gen-print-key`` makes one."""
    now = time.time()
    header = struct.pack("<HIIH", 1, int(now), int(now % 1 * 1e9), 16)
    return base64.b64encode(header + os.urandom(16)).decode()


def keyring_text(name: str, key: str, caps: dict[str, str]) -> str:
    """One keyring section: the entity, its key and its capabilities."""
    lines = [f"[{name}]", f"\tkey = {key}"]
    lines += [f'\tcaps {service} = "{cap}"' for service, cap in caps.items()]
    return "\n".join(lines) + "\n"


@dataclass
class CephCluster:
    """One monitor, one manager and one memstore OSD listening on ``host``, all under ``root``."""

    root: Path
    host: str = "127.0.0.1"
    pool: str = "rbd"
    memstore_bytes: int = MEMSTORE_BYTES
    mon_port: int = 0
    fsid: str = ""
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    # Paths and client settings -----------------------------------------------------------

    @property
    def conf(self) -> Path:
        """The cluster's ceph.conf (also what clients read)."""
        return self.root / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        """The client.admin keyring."""
        return self.root / "client.admin.keyring"

    @property
    def admin_key(self) -> str:
        """The client.admin secret, as Proxmox's ``keyring`` parameter carries it."""
        for line in self.admin_keyring.read_text().splitlines():
            name, _, value = line.strip().partition(" = ")
            if name == "key":
                return value
        raise RuntimeError(f"no key in {self.admin_keyring}")

    @property
    def monhost(self) -> str:
        """The monitor address as clients name it (``mon_host``)."""
        return f"[v2:{self.host}:{self.mon_port}]"

    @property
    def log_dir(self) -> Path:
        """Daemon logs."""
        return self.root / "log"

    def client_settings(self) -> dict[str, str]:
        """Settings a librados client needs, without any file: monitor and admin key."""
        return {"mon_host": self.monhost, "key": self.admin_key}

    def _write_conf(self) -> None:
        root = self.root
        settings = {
            "fsid": self.fsid,
            "mon host": self.monhost,
            "public addr": self.host,
            "cluster addr": self.host,
            "auth cluster required": "cephx",
            "auth service required": "cephx",
            "auth client required": "cephx",
            "admin socket": f"{root}/run/$name.asok",
            "run dir": f"{root}/run",
            "log file": f"{root}/log/$name.log",
            "mon cluster log file": f"{root}/log/cluster.log",
            "crash dir": f"{root}/crash",
            "mon data": f"{root}/mon/$name",
            "osd data": f"{root}/osd/$id",
            "mgr data": f"{root}/mgr/$name",
            "memstore device bytes": str(self.memstore_bytes),
            **FAST_SETTINGS,
        }
        sections = {
            "global": settings,
            "client": {"keyring": str(self.admin_keyring)},
            "osd": {"keyring": "$osd_data/keyring"},
            "mgr": {"keyring": "$mgr_data/keyring"},
        }
        text = "".join(
            f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
            for name, values in sections.items()
        )
        self.conf.write_text(text)

    # Commands ----------------------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = COMMAND_TIMEOUT, stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from err
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-800:]}")
        return done.stdout

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT, stdin: str | None = None) -> str:
        """Run the ``ceph`` command-line tool as client.admin against this cluster."""
        return self._run(
            "ceph", "-c", str(self.conf), "--connect-timeout", str(int(timeout)), *args,
            timeout=timeout, stdin=stdin,
        )  # fmt: skip

    def _daemon(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.log_dir / f"{name}.out")
        self.processes[name] = process
        process.start()
        return process

    # Life cycle --------------------------------------------------------------------------

    def start(self) -> CephCluster:
        """Build and start the cluster from an empty ``root``; stop what started on failure."""
        if self.running:
            return self
        if self.root.exists() and any(self.root.iterdir()):
            raise RuntimeError(f"{self.root} is not empty: stop the cluster there or remove it")
        try:
            self._create()
            self.wait_ready()
        except BaseException:
            with contextlib.suppress(RuntimeError, OSError):
                self.stop()
            raise
        return self

    def _create(self) -> None:
        for folder in ("mon/mon.a", "osd/0", "mgr/mgr.x", "log", "run", "crash"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.mon_port = self.mon_port or free_port(self.host)
        self.fsid = str(uuid.uuid4())
        self._write_conf()
        osd_key, osd_uuid = new_key(), str(uuid.uuid4())
        admin = keyring_text(
            ADMIN,
            new_key(),
            {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"},
        )
        mgr = keyring_text(
            "mgr.x", new_key(), {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}
        )
        self.admin_keyring.write_text(admin)
        (self.root / "mgr/mgr.x/keyring").write_text(mgr)
        (self.root / "osd/0/keyring").write_text(keyring_text("osd.0", osd_key, {}))
        # The monitor starts knowing every key, so no daemon waits on an `auth add`.
        mon_keyring = self.root / "mon.keyring"
        mon_keyring.write_text(
            keyring_text("mon.", new_key(), {"mon": "allow *"})
            + admin
            + mgr
            + keyring_text(
                "osd.0",
                osd_key,
                {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
            )
        )
        monmap = self.root / "monmap"
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                  self.monhost, str(monmap))  # fmt: skip
        conf = str(self.conf)
        self._run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", str(monmap),
                  "--keyring", str(mon_keyring))  # fmt: skip
        self._daemon("mon", ["ceph-mon", "-f", "-c", conf, "-i", "a"])
        self._daemon("mgr", ["ceph-mgr", "-f", "-c", conf, "-i", "x"])
        secret = json.dumps({"cephx_secret": osd_key})
        osd_id = self.ceph("osd", "new", osd_uuid, "-i", "-", stdin=secret).strip()
        if osd_id != "0":
            raise RuntimeError(f"the monitor gave the OSD id {osd_id!r}, not 0")
        self._run("ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("osd", ["ceph-osd", "-f", "-c", conf, "-i", "0"])
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self.ceph("osd", "pool", "application", "enable", self.pool, "rbd")
        self.save()

    def _alive_or_raise(self) -> None:
        for name, process in self.processes.items():
            if not process.alive:
                raise RuntimeError(f"ceph {name} exited:\n{process.tail_log()}")

    def _usable(self) -> bool:
        """A real write and delete succeed, and the manager reports pool usage."""
        probe = self.root / "run" / "probe"
        probe.write_bytes(b"rucher")
        rados = ("rados", "-c", str(self.conf), "-p", self.pool)
        try:
            self._run(*rados, "put", "rucher-probe", str(probe), timeout=10)
            self._run(*rados, "rm", "rucher-probe", timeout=10)
            if not json.loads(self.ceph("mgr", "stat", "-f", "json", timeout=10))["available"]:
                return False
            pools = json.loads(self.ceph("df", "-f", "json", timeout=10))["pools"]
        except RuntimeError:
            return False
        return any(p["name"] == self.pool and p["stats"]["max_avail"] > 0 for p in pools)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the cluster stores objects and reports usage, or raise with its logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive_or_raise()
            if self._usable():
                return
            time.sleep(0.2)
        tails = "\n".join(f"--- {n}\n{p.tail_log()}" for n, p in self.processes.items())
        raise RuntimeError(f"ceph at {self.root} not ready within {timeout:.0f} s\n{tails}")

    @property
    def running(self) -> bool:
        """Whether every daemon of the cluster runs."""
        return bool(self.processes) and all(p.alive for p in self.processes.values())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the OSD, then the manager, then the monitor (SIGTERM, then SIGKILL)."""
        for name in ("osd", "mgr", "mon"):
            if name in self.processes:
                self.processes[name].stop(timeout)
        if self.root.is_dir():
            self.save()

    def save(self) -> None:
        """Describe the cluster in ``root/cluster.json`` for later commands."""
        data = {
            "host": self.host,
            "pool": self.pool,
            "mon_port": self.mon_port,
            "fsid": self.fsid,
            "memstore_bytes": self.memstore_bytes,
            "processes": {name: p.to_dict() for name, p in self.processes.items()},
        }
        partial = self.root / f"{STATE_FILE}.tmp"
        partial.write_text(json.dumps(data, indent=2) + "\n")
        partial.replace(self.root / STATE_FILE)

    @classmethod
    def load(cls, root: Path) -> CephCluster:
        """Find a cluster again from its ``cluster.json``."""
        data: dict[str, Any] = json.loads((root / STATE_FILE).read_text())
        return cls(
            root=root,
            host=data["host"],
            pool=data["pool"],
            mon_port=data["mon_port"],
            fsid=data["fsid"],
            memstore_bytes=data["memstore_bytes"],
            processes={name: ManagedProcess.from_dict(p) for name, p in data["processes"].items()},
        )

    def describe(self) -> dict[str, Any]:
        """What a client needs, and what runs."""
        return {
            "conf": str(self.conf),
            "monhost": self.monhost,
            "pool": self.pool,
            "username": "admin",
            "keyring": str(self.admin_keyring),
            "running": self.running,
            "daemons": {name: p.pid for name, p in self.processes.items()},
        }


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One real single-node Ceph on 127.0.0.1 for the session; skipped only if not installed."""
    reason = ceph_unavailable()
    if reason is not None:
        pytest.skip(f"Ceph unavailable: {reason}")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _owner_alive(pid_file: Path) -> bool:
    """Whether the process ``pid_file`` names runs (and is a dev stack supervisor)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False
    return b"rucher.testing.stack" in cmdline and is_same_process_alive(pid, None)


def follow(root: Path, pid_file: Path, patience: float = FOLLOW_PATIENCE) -> int:
    """Stop the cluster (and remove its folder) once the owner named in ``pid_file`` is gone.

    The owner may appear up to ``patience`` seconds late (``ops/up`` starts Ceph first). Ends
    at once if the cluster is stopped by other means; SIGTERM stops the cluster too.
    """
    cluster = CephCluster.load(root)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    seen, started = False, time.monotonic()
    try:
        while cluster.running:
            if _owner_alive(pid_file):
                seen = True
            elif seen or time.monotonic() - started > patience:
                break
            time.sleep(0.5)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _start_follower(root: Path, pid_file: Path) -> None:
    """A detached ``follow`` process for the cluster in ``root``, unless one runs."""
    record = root / "run" / FOLLOWER_FILE
    try:
        pid, ticks = (int(field) for field in record.read_text().split())
        if is_same_process_alive(pid, ticks):
            return
    except (OSError, ValueError):
        pass
    argv = [sys.executable, "-m", "rucher.testing.ceph", "follow", "--root", str(root),
            "--follow", str(pid_file)]  # fmt: skip
    with (root / "log" / "follow.out").open("ab") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    record.write_text(f"{process.pid} {process_start_ticks(process.pid)}\n")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``up [--follow PIDFILE]``, ``down [--purge]``, ``status``, ``follow``."""
    parser = argparse.ArgumentParser(prog="rucher.testing.ceph", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "follow"])
    parser.add_argument("--root", type=Path, required=True, help="the cluster's folder")
    parser.add_argument("--host", default="127.0.0.1", help="the address daemons listen on")
    parser.add_argument("--purge", action="store_true", help="down: remove the folder too")
    parser.add_argument("--print-conf", action="store_true", help="up: print only the conf path")
    parser.add_argument("--follow", type=Path, help="up: stop when this pid file's owner ends")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    if args.command == "follow":
        return follow(root, args.follow)
    known = (root / STATE_FILE).is_file()
    cluster = CephCluster.load(root) if known else CephCluster(root, host=args.host)
    if args.command == "up":
        if not cluster.running:
            if known:
                cluster.stop()  # whatever is left of an earlier run: memstore kept no data
                shutil.rmtree(root)
                cluster = CephCluster(root, host=args.host)
            reason = ceph_unavailable()
            if reason is not None:
                print(f"ops/ceph: {reason}", file=sys.stderr)
                return 1
            started = time.monotonic()
            cluster.start()
            if not args.print_conf:
                print(f"Ceph is up in {time.monotonic() - started:.1f} s.")
        if args.follow is not None:
            _start_follower(root, args.follow.resolve())
        if args.print_conf:
            print(cluster.conf)
        else:
            print(json.dumps(cluster.describe(), indent=2))
        return 0
    if args.command == "down":
        cluster.stop()
        if args.purge and root.exists():
            shutil.rmtree(root)
        print("Ceph stopped." if known else "Ceph was not running here.")
        return 0
    print(json.dumps(cluster.describe(), indent=2))
    return 0 if cluster.running else 3


if __name__ == "__main__":
    sys.exit(main())
